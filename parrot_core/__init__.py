"""Parrot: the multilingual vision-language model with PyTorch and MLX backends.

`import parrot` imports neither torch nor mlx; `parrot.load(..., backend=...)` imports the chosen
backend lazily.
"""

from .api import BACKENDS, ParrotModel, load
from .config import ParrotConfig, VisionConfig
from .constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .errors import ParrotError

__version__ = "0.1.0"
__all__ = [
    "BACKENDS", "IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "ParrotConfig", "ParrotError", "ParrotModel",
    "VisionConfig", "load", "__version__",
]
