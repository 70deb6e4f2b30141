"""visionlin: linear-complexity vision backbones for timm. Importing it registers the models."""
__version__ = "0.1.0"

from . import kernels, layers, models  # noqa: E402,F401  (models register with timm on import)
