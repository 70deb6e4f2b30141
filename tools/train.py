"""Train (or fine-tune) any registered model with an mmengine config, on one process or many.

    python tools/train.py configs/vig/vig_t_8xb128_in1k.py --work-dir work_dirs/vig_t
    python tools/train.py CONFIG --resume                       # continue from the latest checkpoint
    python tools/train.py configs/digits/vig_t_digits.py --data-root data/digits   # CPU, minutes
    python tools/train.py CONFIG --amp bf16 --cfg-options train_dataloader.batch_size=64
    torchrun --nproc-per-node 8 tools/train.py CONFIG           # DDP on 8 GPUs (gloo on CPU)
    torchrun --nnodes 2 --node-rank 0 --master-addr HOST --nproc-per-node 8 tools/train.py CONFIG

Checkpoints (``epoch_N.pth``) are written atomically into the work dir; ``--resume`` picks the one
of the highest epoch there (or the path given) and restores weights, optimizer, schedule, EMA and the
epoch, and the run continues with the same random streams (``EpochSeedHook``).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch
from mmengine.config import Config, DictAction
from mmengine.runner import Runner


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("config", help="mmengine config file")
    p.add_argument("--work-dir", help="where logs and checkpoints go (default: work_dirs/<config name>)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the latest checkpoint in the work dir, or from the path given")
    p.add_argument("--data-root", help="image folder root (<root>/train, <root>/val) for every split")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="automatic mixed precision")
    p.add_argument("--grad-checkpointing", action="store_true", help="trade compute for activation memory")
    p.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (work dir/vis_data)")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                   help="override config entries: key=value (e.g. train_cfg.max_epochs=10)")
    return p.parse_args(argv)


def build_config(args) -> Config:
    if not os.path.isfile(args.config):
        raise SystemExit(f"config not found: {args.config}")
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or os.path.join("work_dirs", Path(args.config).stem)
    if args.data_root:
        for split in ("train_dataloader", "val_dataloader", "test_dataloader"):
            if cfg.get(split):
                cfg[split].dataset.data_root = args.data_root
    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.dtype = "bfloat16" if args.amp == "bf16" else "float16"
        cfg.optim_wrapper.loss_scale = "dynamic" if args.amp == "fp16" else None
    if cfg.optim_wrapper.get("type") == "AmpOptimWrapper" and not torch.cuda.is_available():
        if args.amp:
            raise SystemExit("--amp needs a CUDA GPU (mmengine's AmpOptimWrapper); leave it out on CPU")
        print("note: this recipe trains with AMP, which needs a CUDA GPU; training in float32 here", flush=True)
        cfg.optim_wrapper.type = "OptimWrapper"
        for key in ("dtype", "loss_scale"):
            cfg.optim_wrapper.pop(key, None)
    if args.grad_checkpointing:
        cfg.model.grad_checkpointing = True
    if args.tensorboard:
        cfg.visualizer.vis_backends.append(dict(type="TensorboardVisBackend"))
    if args.deterministic:
        cfg.randomness.deterministic = True
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cfg.launcher = "pytorch" if distributed else "none"
    if distributed and not torch.cuda.is_available():
        # mmengine's launcher always picks a CUDA device; on CPU start gloo here and keep DDP off devices
        cfg.env_cfg.dist_cfg = dict(backend="gloo")
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="gloo")
    return cfg


def resolve_resume(cfg: Config, resume) -> None:
    from visionlin.training import latest_checkpoint
    if resume is None:
        return
    path = latest_checkpoint(cfg.work_dir) if resume == "auto" else resume
    if path is None:
        print(f"--resume: no checkpoint in {cfg.work_dir} yet; starting from scratch", flush=True)
        return
    if not os.path.isfile(path):
        raise SystemExit(f"--resume: checkpoint not found: {path}")
    cfg.resume, cfg.load_from = True, path


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = build_config(args)
    import visionlin.training  # noqa: F401  (registers our types before the runner builds them)
    resolve_resume(cfg, args.resume)
    runner = Runner.from_cfg(cfg)
    try:
        runner.train()
    except BaseException:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise
    del runner
    shutdown_distributed()


def shutdown_distributed() -> None:
    """End a distributed run while the interpreter is still whole.

    A gloo group's worker threads outlive ``destroy_process_group`` while DDP's reducer still holds the
    group, and one that frees a finished collective's tensors during interpreter shutdown aborts the
    rank ("terminate called without an active exception") after training has succeeded. So: wait for
    every rank's outstanding collectives, drop the last references to the wrapped model, then destroy."""
    if not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    gc.collect()
    torch.distributed.destroy_process_group()

if __name__ == "__main__":
    sys.exit(main())
