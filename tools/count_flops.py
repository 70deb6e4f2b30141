"""Count multiply-accumulates (GMACs) of timm models at given resolutions, the same way for all.

How it counts (and why): every linear layer and convolution is counted from the ops that run
(torch's FlopCounterMode: mm, addmm, convolution); the token mixers are counted analytically,
because what an implementation executes (chunk padding, float64 sub-blocks, fused kernels) is not
the model's cost:
  * softmax attention (timm ``Attention``): Q K^T and A V, 2 * N^2 * D per layer;
  * bidirectional GLA (visionlin ``BidirectionalGLA2d``): the recurrent form, per direction a
    state update k^T v and a read-out q h, so 2 directions * 2 * N * H * K * V per layer;
  * RAVLT's mixers (visionlin ``RankAugmentedAttention``): RALA per head k^T v and q S (2 N d^2) plus
    the key mean, the denominators and the alpha logits (3 N d), so N * C * (2 d + 3) per layer;
    the softmax sibling Q K^T and A V, 2 * N^2 * C per layer;
  * selective scans (Vim's ``BiMambaMixer``, VMamba's ``SS2D``): the recurrent form, per route and
    per (channel, state, token) a state update (delta B u) and a read-out (C x), so
    routes * 2 * L * d_inner * d_state; plus the per-route projections that run inside the fused ops or
    as batched matmuls rather than as counted ops: dt_proj (routes * L * dt_rank * d_inner, formed by
    the scan) and x_proj (routes * L * d_inner * (dt_rank + 2 d_state); Vim's within its conv op,
    VMamba's an einsum); plus Vim's causal depthwise conv1d, which runs as shifted multiply-adds
    (2 directions * L * d_inner * 4).
Elementwise work (norms, activations, gates) is not counted, as in the papers' tables.

    python tools/count_flops.py --models vig_t deit_tiny_patch16_224 --resolutions 224 1024
"""
from __future__ import annotations

import argparse
from typing import Dict, Sequence

import timm
import torch
from timm.models.vision_transformer import Attention
from torch.utils.flop_counter import FlopCounterMode

import visionlin  # noqa: F401  (registers the models)
from visionlin.layers import SS2D, BidirectionalGLA2d, BiMambaMixer, RankAugmentedAttention

_COUNTED_OPS = ("aten.mm", "aten.addmm", "aten.convolution")
_MIXERS = (BidirectionalGLA2d, RankAugmentedAttention, BiMambaMixer, SS2D, Attention)


def _mixer_macs(module, inputs, output, totals: Dict[str, float]) -> None:
    x = inputs[0]
    if isinstance(module, BidirectionalGLA2d):
        B, H, W, _ = x.shape
        totals["mixer"] += B * 2 * 2 * H * W * module.num_heads * module.head_k_dim * module.head_v_dim
    elif isinstance(module, RankAugmentedAttention):
        B, C, H, W = x.shape
        N = H * W
        totals["mixer"] += B * N * C * (2 * module.head_dim + 3) if module.linear else B * 2 * N * N * C
    elif isinstance(module, BiMambaMixer):
        B, L, _ = x.shape
        conv, x_proj = module.fwd.conv1d.kernel_size[0], module.dt_rank + 2 * module.d_state
        totals["mixer"] += B * 2 * L * module.d_inner * (2 * module.d_state + module.dt_rank + conv + x_proj)
    elif isinstance(module, SS2D):
        B, _, H, W = x.shape
        x_proj = module.dt_rank + 2 * module.d_state
        totals["mixer"] += B * module.routes * H * W * module.d_inner * (2 * module.d_state + module.dt_rank + x_proj)
    else:  # timm Attention on (B, N, D)
        B, N, D = x.shape
        totals["mixer"] += B * 2 * N * N * D


def count_macs(model: torch.nn.Module, resolution: int, in_chans: int = 3) -> Dict[str, float]:
    """GMACs of one image at resolution x resolution: {'layers', 'mixer', 'total'}."""
    totals = {"mixer": 0.0}
    hooks = [m.register_forward_hook(lambda mod, i, o: _mixer_macs(mod, i, o, totals))
             for m in model.modules() if isinstance(m, _MIXERS)]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval()(torch.zeros(1, in_chans, resolution, resolution))
    finally:
        for h in hooks:
            h.remove()
    layers = sum(v for k, v in counter.get_flop_counts()["Global"].items() if str(k) in _COUNTED_OPS) / 2
    return {"layers": layers / 1e9, "mixer": totals["mixer"] / 1e9, "total": (layers + totals["mixer"]) / 1e9}


def build(name: str, resolution: int) -> torch.nn.Module:
    """Models with a fixed input size (DeiT) are built at the resolution, the others as released."""
    cfg = timm.get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size:
        return timm.create_model(name, img_size=resolution)
    return timm.create_model(name)


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vig_t", "vig_s", "vig_b", "vig_h_t", "vig_h_s", "vig_h_b"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[224])
    args = parser.parse_args(argv)
    print("| model | resolution | params (M) | layers GMACs | mixer GMACs | total GMACs |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        for res in args.resolutions:
            model = build(name, res)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            macs = count_macs(model, res)
            print(f"| {name} | {res} | {params:.2f} | {macs['layers']:.3f} | {macs['mixer']:.3f} | {macs['total']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
