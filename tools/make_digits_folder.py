"""Write scikit-learn's handwritten digits (1,797 8x8 images, 10 classes, shipped inside the package:
no download) as an ImageFolder dataset, upscaled, to try the training tools without ImageNet.

    python tools/make_digits_folder.py data/digits --size 32
    # -> data/digits/train/<0..9>/*.png and data/digits/val/<0..9>/*.png
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import numpy as np
from PIL import Image


def make_digits_folder(out: str, size: int = 32, val_fraction: float = 0.25, limit: int = 0, seed: int = 0) -> dict:
    """Write the folder (atomically: built beside ``out`` and renamed); returns image counts per split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("this tool needs scikit-learn: pip install scikit-learn") from e
    if not 0.0 < val_fraction < 1.0:
        raise SystemExit(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if os.path.exists(out):
        raise SystemExit(f"{out} exists; remove it or choose another folder")
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    if limit:
        order = order[:limit]
    n_val = int(round(len(order) * val_fraction))
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".digits.")
    counts = {"train": 0, "val": 0}
    try:
        for rank, i in enumerate(order):
            split = "val" if rank < n_val else "train"
            folder = os.path.join(tmp, split, str(digits.target[i]))
            os.makedirs(folder, exist_ok=True)
            pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).save(
                os.path.join(folder, f"{i:04d}.png"))
            counts[split] += 1
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("out")
    p.add_argument("--size", type=int, default=32, help="side of the upscaled images in pixels")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--limit", type=int, default=0, help="use only this many images (0: all 1,797)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    counts = make_digits_folder(args.out, args.size, args.val_fraction, args.limit, args.seed)
    print(f"wrote {counts['train']} training and {counts['val']} validation images to {args.out}")


if __name__ == "__main__":
    main()
