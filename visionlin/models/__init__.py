"""Model families; importing this module registers every model with timm."""
from . import ravlt, vig, vim, vmamba  # noqa: F401
from .ravlt import RAVLT
from .vig import ViG, ViGH
from .vim import Vim
from .vmamba import VMamba

__all__ = ["RAVLT", "ViG", "ViGH", "Vim", "VMamba"]
