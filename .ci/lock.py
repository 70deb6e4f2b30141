"""Regenerate constraints.txt, the lock: every package that ``pip install -e ".[dev]"`` resolves, pinned.

    python .ci/lock.py                  # resolve afresh and rewrite constraints.txt
    python .ci/lock.py --out FILE       # write elsewhere (to compare)

pip resolves the ``[dev]`` extras (the union of every extra) as on a fresh machine (``--dry-run
--ignore-installed --report``: nothing is installed, nothing in the current environment is reused), with
torch and torchvision held at the versions the current lock names (the builds our machines carry on disk;
to move them, edit those two lines first). Every other package gets the newest release that the ranges
in pyproject.toml allow. Then run ``.ci/run``: CI installs exactly this set in a brand-new environment.
The resolution is for this platform (Linux x86-64, this Python); elsewhere pip leaves packages that
only that platform needs (and the lock does not name) unconstrained.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELD = ("torch", "torchvision")


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def held_pins(lock: Path) -> list[str]:
    pins = {}
    for line in lock.read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and canonical(name) in HELD:
            pins[canonical(name)] = f"{canonical(name)}=={version.strip()}"
    missing = [name for name in HELD if name not in pins]
    if missing:
        raise SystemExit(f"{lock} must pin {', '.join(missing)} (name==version) to hold them")
    return [pins[name] for name in HELD]


def resolve(held: list[str]) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        hold, report = Path(tmp) / "held.txt", Path(tmp) / "report.json"
        hold.write_text("\n".join(held) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), "-c", str(hold), "-e", f"{ROOT}[dev]"]
        print("+ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        installs = json.loads(report.read_text())["install"]
    return {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in installs
            if canonical(item["metadata"]["name"]) != "visionlin"}


def render(pins: dict[str, str]) -> str:
    head = ["# The lock: every package `pip install -e \".[dev]\"` resolves, pinned; CI installs exactly this set.",
            f"# Regenerate with `python .ci/lock.py` (resolved on {platform.system()} {platform.machine()}, "
            f"CPython {platform.python_version()}; torch and torchvision held, see .ci/lock.py)."]
    return "\n".join(head + [f"{name}=={pins[name]}" for name in sorted(pins)]) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "constraints.txt")
    args = p.parse_args(argv)
    pins = resolve(held_pins(ROOT / "constraints.txt"))
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(render(pins))
    os.replace(tmp, args.out)
    print(f"{args.out}: {len(pins)} packages pinned")


if __name__ == "__main__":
    main()
