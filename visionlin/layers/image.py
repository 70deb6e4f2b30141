"""Input checks and position-embedding helpers shared by the families (FX leaves: shape logic)."""
from typing import List, Tuple

import torch
from timm.layers import register_notrace_function, resample_abs_pos_embed


def shape_str(shape: List[int]) -> str:
    """A shape as Python prints a tuple, "(2, 3)" (also in TorchScript, which has no tuple(x.shape))."""
    return "(" + ", ".join([str(s) for s in shape]) + (",)" if len(shape) == 1 else ")")


@register_notrace_function
def check_image(x: torch.Tensor, in_chans: int, divisor: int) -> None:
    """Raise a ValueError unless x is (B, in_chans, H, W) with H and W multiples of ``divisor``."""
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected an image batch of shape (B, {in_chans}, H, W), got {shape_str(x.shape)}")
    if x.shape[-2] % divisor or x.shape[-1] % divisor:
        raise ValueError(f"image size {shape_str(x.shape[-2:])} is not divisible by {divisor}; "
                         f"this model needs H and W that are multiples of {divisor}")


@register_notrace_function
def add_pos_embed(x: torch.Tensor, pos_embed: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
    """Add a (1, gh*gw, C) position embedding to channels-last tokens, resampled to their grid."""
    B, H, W, C = x.shape
    if (H, W) != tuple(grid_size):
        pos_embed = resample_abs_pos_embed(pos_embed, (H, W), grid_size, num_prefix_tokens=0, antialias=False)
    return x + pos_embed.view(1, H, W, C)
