"""Layers shared by the model families (timm's layers are used wherever timm has one)."""
from .gla import BidirectionalGLA2d
from .image import add_pos_embed, check_image
from .mlp import swiglu_hidden_dim, swiglu_mlp

__all__ = ["BidirectionalGLA2d", "add_pos_embed", "check_image", "swiglu_hidden_dim", "swiglu_mlp"]
