"""The backends, by name, and the machine's default one (to grow into the backend registry)."""

from __future__ import annotations

import importlib.util
import platform
import sys

BACKENDS = ("mlx", "cpu", "cuda")


def default_backend() -> str:
    """mlx on Apple silicon (when installed), else cuda when a GPU is visible, else cpu (mlx when torch is
    not installed). Every command's --backend default, and TrainConfig's when its backend is None."""
    if sys.platform == "darwin" and platform.machine() == "arm64" and importlib.util.find_spec("mlx"):
        return "mlx"
    if importlib.util.find_spec("torch"):
        import torch  # lazily: only to ask whether a GPU is visible

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "mlx"
