"""Layers shared by the model families (timm's layers are used wherever timm has one)."""
from .gla import BidirectionalGLA2d
from .image import add_pos_embed, check_image
from .linfusion import FeatureMLP, GeneralizedLinearAttention, generalized_linear_attention
from .mamba import BiMambaMixer
from .mlp import swiglu_hidden_dim, swiglu_mlp
from .rala import RankAugmentedAttention, apply_rope, rope_2d
from .ss2d import SS2D, Linear2d

__all__ = ["BidirectionalGLA2d", "BiMambaMixer", "add_pos_embed", "check_image", "swiglu_hidden_dim", "swiglu_mlp",
           "RankAugmentedAttention", "apply_rope", "rope_2d", "SS2D", "Linear2d", "FeatureMLP",
           "GeneralizedLinearAttention", "generalized_linear_attention"]
