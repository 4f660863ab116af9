"""Layout conversion between official, MLX (optionally quantized), DeepSpeed and DCP checkpoints.

`convert_checkpoint(src, dst, to="mlx", ...)` is what `parrot convert` calls.
"""

from .core import ConversionResult, convert_checkpoint

__all__ = ["ConversionResult", "convert_checkpoint"]
