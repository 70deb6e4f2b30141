"""Model families; importing this module registers every model with timm."""
from . import ravlt, vig  # noqa: F401
from .ravlt import RAVLT
from .vig import ViG, ViGH

__all__ = ["RAVLT", "ViG", "ViGH"]
