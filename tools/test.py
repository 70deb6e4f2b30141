"""Evaluate a checkpoint with an mmengine config: top-1 / top-5 on the config's test split.

    python tools/test.py configs/vig/vig_t_8xb128_in1k.py work_dirs/vig_t/epoch_300.pth
    python tools/test.py configs/ravlt/ravlt_s_8xb128_in1k.py ravlt_s.safetensors   # converted official
    torchrun --nproc-per-node 8 tools/test.py CONFIG CHECKPOINT

Takes our training checkpoints (EMA weights when EMA was on), safetensors files written by
tools/convert_checkpoint.py, and official checkpoints the family's filter understands.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from mmengine.config import DictAction
from mmengine.runner import Runner

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import build_config  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("config")
    p.add_argument("checkpoint")
    p.add_argument("--work-dir", help="where the evaluation log goes (default: a temporary folder)")
    p.add_argument("--data-root", help="image folder root (<root>/val) for the test split")
    p.add_argument("--out", help="also write the metrics as JSON to this file")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={})
    args = p.parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        raise SystemExit(f"checkpoint not found: {args.checkpoint}")
    args.amp = args.grad_checkpointing = args.tensorboard = args.deterministic = False
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="visionlin_test_")
    args.work_dir = work_dir
    cfg = build_config(args)
    cfg.model.init_checkpoint = None
    cfg.load_from, cfg.resume = None, False
    cfg.custom_hooks = [h for h in cfg.get("custom_hooks", []) if h["type"] != "EMAHook"]  # weights are final
    cfg.default_hooks.checkpoint = None
    import visionlin.training  # noqa: F401
    from visionlin.training import load_model_weights
    runner = Runner.from_cfg(cfg)
    load_model_weights(runner.model.model if hasattr(runner.model, "model") else runner.model.module.model,
                       args.checkpoint)
    metrics = runner.test()
    print(json.dumps(metrics), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(metrics, f)
    return metrics


if __name__ == "__main__":
    main()
