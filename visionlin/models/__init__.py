"""Model families; importing this module registers every model with timm."""
from . import vig  # noqa: F401
from .vig import ViG, ViGH

__all__ = ["ViG", "ViGH"]
