"""Which torch devices this machine has (imports torch only: the registry asks it for the default backend)."""

from __future__ import annotations

import torch


def cuda_problem() -> str | None:
    """Why the cuda backend cannot run here, or None."""
    return None if torch.cuda.is_available() else "no CUDA GPU is available on this machine"
