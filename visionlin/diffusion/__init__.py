"""Linear attention for diffusers pipelines (needs the ``[diffusion]`` extra)."""
try:
    import diffusers  # noqa: F401
except ImportError as e:
    raise ImportError("visionlin.diffusion needs diffusers: pip install visionlin[diffusion]") from e

from .lindit import (LINDIT_CONFIGS, LinDiTTransformer2DModel, create_lindit, lindit_b_2, lindit_l_2, lindit_s_2,
                     lindit_xl_2)
from .linfusion import FeatureDim, LinearAttentionSpec, LinearizedAttention, LinFusionAttnProcessor, linearize

__all__ = ["linearize", "LinearizedAttention", "LinFusionAttnProcessor", "LinearAttentionSpec", "FeatureDim",
           "LinDiTTransformer2DModel", "LINDIT_CONFIGS", "create_lindit", "lindit_s_2", "lindit_b_2", "lindit_l_2",
           "lindit_xl_2"]
