"""Hooks: a concise progress line (and the count of skipped images), and per-epoch seeding."""
from __future__ import annotations

import datetime
import os
import random
import time

import numpy as np
import torch
from mmengine.dist import all_reduce, get_rank, is_main_process
from mmengine.hooks import Hook
from mmengine.registry import FUNCTIONS, HOOKS


@HOOKS.register_module()
class ProgressHook(Hook):
    """Every ``interval`` iterations and at the end of each epoch, one line on the main process:
    ``epoch 2/10 iter 30/100 | loss 0.532 | lr 1.0e-03 | 120.5 img/s | eta 0:01:23``; at the end of
    every epoch the number of images skipped as unreadable (over all processes), if any."""
    priority = "LOW"

    def __init__(self, interval: int = 50):
        self.interval = interval
        self._skipped = 0
        self._images = 0
        self._t0 = None

    def before_train_epoch(self, runner) -> None:
        self._skipped, self._images, self._t0 = 0, 0, time.perf_counter()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if data_batch is not None:
            self._skipped += int(data_batch.get("skipped", 0))
            self._images += len(data_batch["inputs"])
        n = len(runner.train_dataloader)
        if (batch_idx + 1) % self.interval and batch_idx + 1 != n:
            return
        elapsed = time.perf_counter() - self._t0
        rate = self._images / max(elapsed, 1e-9)
        done = runner.epoch * n + batch_idx + 1
        total = runner.max_epochs * n
        eta = elapsed / (batch_idx + 1) * (total - done)
        loss = outputs["loss"].item() if outputs and "loss" in outputs else float("nan")
        lr = runner.optim_wrapper.get_lr()["lr"][0]
        if is_main_process():
            print(f"epoch {runner.epoch + 1}/{runner.max_epochs} iter {batch_idx + 1}/{n} | loss {loss:.4f} | "
                  f"lr {lr:.2e} | {rate:.1f} img/s per process | eta {datetime.timedelta(seconds=round(eta))}",
                  flush=True)

    def after_train_epoch(self, runner) -> None:
        skipped = torch.tensor(self._skipped)
        all_reduce(skipped)
        if int(skipped):
            runner.logger.warning(f"epoch {runner.epoch}: skipped {int(skipped)} unreadable images")
        runner.message_hub.update_scalar("train/skipped_images", int(skipped))


@HOOKS.register_module()
class EpochSeedHook(Hook):
    """Seeds Python, numpy and torch at the start of every training epoch from (seed, epoch[, rank]).

    The random state an epoch starts from (dropout, drop path, mixup, the data-loader worker seeds)
    then depends on nothing that happened before, in particular not on whether the run was resumed
    from the previous epoch's checkpoint or how much validation drew in between: a resumed run
    continues with exactly the random streams of an uninterrupted one. (mmengine seeds once.)"""
    priority = "VERY_HIGH"

    def before_train_epoch(self, runner) -> None:
        diff_rank = runner._randomness_cfg.get("diff_rank_seed", False)
        seed = (runner.seed * 1000003 + runner.epoch * 101 + (get_rank() if diff_rank else 0)) % 2 ** 31
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


@FUNCTIONS.register_module()
def seed_worker_from_torch(worker_id: int) -> None:
    """Data-loader worker init: numpy seeded from the worker's torch seed (which the loader draws from
    the main process's generator each epoch, and which seeds Python's ``random`` too), offset by the
    rank so processes augment differently. Unlike mmengine's default, augmentations change between
    epochs even without persistent workers, and stay reproducible."""
    seed = (torch.initial_seed() + 7919 * int(os.environ.get("RANK", 0))) % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
