"""Runs ``timm.create_model(name, pretrained=True, ...)`` for each case of a JSON spec, in a process whose environment
(HF_HUB_OFFLINE, HF_HUB_CACHE, TORCH_HOME) the test set up, and records the logits on a fixed input or the error.

    python pretrained_worker.py SPEC.json      # [{"name", "kwargs", "out"}], x.pt beside it; writes SPEC.results.json
"""
import json
import sys
from pathlib import Path

import timm
import torch

import visionlin  # noqa: F401


def main(spec_path: str) -> None:
    spec_path = Path(spec_path)
    cases = json.loads(spec_path.read_text())
    x = torch.load(spec_path.parent / "x.pt")
    results = {}
    for case in cases:
        try:
            model = timm.create_model(case["name"], pretrained=True, **case["kwargs"]).eval()
            with torch.no_grad():
                torch.save(model(x), case["out"])
            results[case["out"]] = {"ok": True}
        except Exception as e:  # recorded for the test to check
            results[case["out"]] = {"ok": False, "type": type(e).__name__, "message": str(e)}
    spec_path.with_suffix(".results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
