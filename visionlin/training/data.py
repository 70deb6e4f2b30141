"""ImageFolder-layout datasets with timm's transforms, unreadable images skipped, and repeated augmentation."""
from __future__ import annotations

import math
import os
import warnings
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from mmengine.dataset import DefaultSampler
from mmengine.registry import DATA_SAMPLERS, DATASETS, FUNCTIONS
from PIL import Image
from timm.data import create_transform

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _find_samples(root: str, classes: Optional[Sequence[str]]):
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder not found: {root}")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise ValueError(f"{root} is not an image folder: expected one sub-folder per class "
                         f"(<root>/<class>/<image>), found no sub-folders")
    classes = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root} has class folders {unknown[:5]} that are not among the {len(classes)} "
                         "classes this dataset was given")
    samples = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
            samples += [(os.path.join(dirpath, f), label) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
    if not samples:
        raise ValueError(f"{root} has class folders but no images with extensions {IMG_EXTENSIONS}")
    return classes, samples


@DATASETS.register_module()
class ImageFolderDataset(torch.utils.data.Dataset):
    """``<data_root>/<split>/<class>/<image>`` (ImageNet's train/val layout or any user folder).

    ``transform`` holds keyword arguments of ``timm.data.create_transform`` (input_size, is_training,
    auto_augment, re_prob, interpolation, crop_pct, mean, std, ...). ``classes`` fixes the class order
    (e.g. a validation split that lacks some classes); by default it is the sorted folder names.
    An image that cannot be decoded is skipped with a warning (``__getitem__`` returns None and
    ``collate_skipping_unreadable`` drops it and counts it).
    """

    def __init__(self, data_root: str, split: str = "", transform: Optional[Dict] = None,
                 classes: Optional[Sequence[str]] = None):
        self.root = os.path.join(data_root, split) if split else data_root
        self.classes, self.samples = _find_samples(self.root, classes)
        self.metainfo = dict(classes=tuple(self.classes))
        self.transform = create_transform(**(transform or dict(input_size=224)))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            warnings.warn(f"skipping unreadable image {path}: {e}")
            return None
        return self.transform(img), label


@FUNCTIONS.register_module()
def collate_skipping_unreadable(batch: List) -> Dict:
    """Stack (image, label) pairs, dropping the unreadable ones (None) and counting them in 'skipped'."""
    kept = [b for b in batch if b is not None]
    if not kept:
        raise RuntimeError(f"all {len(batch)} images of a batch were unreadable; check the dataset")
    return dict(inputs=torch.stack([b[0] for b in kept]), labels=torch.tensor([b[1] for b in kept]),
                skipped=len(batch) - len(kept))


@DATA_SAMPLERS.register_module()
class RepeatedAugmentationSampler(DefaultSampler):
    """Repeated augmentation (DeiT's RA sampler): each epoch a seeded shuffle in which every index
    appears ``num_repeats`` times in a row, dealt round-robin to the ranks (so with several processes
    the copies of an image land in different ones); each rank takes ``ceil(len(dataset) / world_size)``
    samples, so an epoch has as many samples as the dataset: 1 / num_repeats of the images, each
    ``num_repeats`` times with different augmentations."""

    def __init__(self, dataset, shuffle: bool = True, seed: Optional[int] = None, num_repeats: int = 3,
                 round_up: bool = True):
        super().__init__(dataset, shuffle=shuffle, seed=seed, round_up=round_up)
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        self.num_repeats = num_repeats
        self.num_samples = math.ceil(len(dataset) / self.world_size)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g) if self.shuffle else torch.arange(len(self.dataset))
        indices = order.repeat_interleave(self.num_repeats).tolist()
        total = self.num_samples * self.world_size * self.num_repeats
        indices += indices[:total - len(indices)]
        return iter(indices[self.rank:total:self.world_size][:self.num_samples])

    def __len__(self) -> int:
        return self.num_samples


__all__ = ["ImageFolderDataset", "collate_skipping_unreadable", "RepeatedAugmentationSampler"]
