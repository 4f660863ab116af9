"""`parrot.load` and the loaded-model interface both backends implement."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint
from .config import DTYPES
from .constants import IMAGE_TOKEN_INDEX
from .errors import ParrotError
from .hub import resolve_model_path
from .image import preprocess
from .prompt import build_inference_ids
from .tokenizer import Tokenizer

BACKENDS = ("mlx", "cpu", "cuda")


class ParrotModel:
    """A loaded Parrot model. Backends implement `logits` (and generation) on top of this."""

    backend: str = "?"

    def __init__(self, checkpoint: Checkpoint, dtype: str):
        self.checkpoint = checkpoint
        self.path = checkpoint.path
        self.config = checkpoint.config
        self.vision_config = checkpoint.tower.config
        self.image_settings = checkpoint.tower.image
        self.dtype = dtype
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_dir(self.path)
        return self._tokenizer

    @property
    def num_visual_tokens(self) -> int:
        return self.config.num_visual_tokens(self.vision_config)

    def preprocess(self, image) -> np.ndarray:
        """float32 [1, 3, H, W] pixels for a path, bytes or PIL image (official pipeline)."""
        return preprocess(image, self.image_settings)

    def encode_prompt(self, prompt: str, has_image: bool, system: str | None = None,
                      history: list[tuple[str, str]] | None = None) -> list[int]:
        """Token ids of the ChatML prompt, with -200 where the image goes."""
        return build_inference_ids(self.tokenizer, prompt, has_image, system, history)

    def logits(self, input_ids: list[int], pixels: np.ndarray | None = None) -> np.ndarray:
        """float32 [T, vocab] logits; T counts the visual tokens spliced in at the placeholder.

        The MoE's text context is every text token of `input_ids` (official inference semantics).
        """
        n_img = sum(1 for i in input_ids if i == IMAGE_TOKEN_INDEX)
        if n_img > 1:
            raise ParrotError("input_ids hold more than one image placeholder (-200); Parrot takes one image")
        if n_img == 1 and pixels is None:
            raise ParrotError("input_ids hold an image placeholder (-200) but no pixels were given")
        if n_img == 0 and pixels is not None:
            raise ParrotError("pixels were given but input_ids hold no image placeholder (-200)")
        bad = [i for i in input_ids if i != IMAGE_TOKEN_INDEX and not 0 <= i < self.config.vocab_size]
        if bad:
            raise ParrotError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return self._logits(list(input_ids), pixels)

    def _logits(self, input_ids: list[int], pixels: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ParrotError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "mlx" and importlib.util.find_spec("mlx") is None:
        raise ParrotError("--backend mlx needs MLX, which is not installed: pip install 'parrot-vlm[mlx]'")
    if backend in ("cpu", "cuda") and importlib.util.find_spec("torch") is None:
        raise ParrotError(f"--backend {backend} needs PyTorch, which is not installed: pip install 'parrot-vlm[torch]'")
    if backend == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ParrotError("--backend cuda: no CUDA GPU is available on this machine; use --backend cpu or mlx")


def load(
    path: str | Path,
    backend: str = "cpu",
    dtype: str | None = None,
    vision_tower: str | Path | None = None,
) -> ParrotModel:
    """Loads an official-layout or MLX-layout Parrot directory (or a hub id, when online).

    backend: "mlx", "cpu" or "cuda". dtype: float32 / float16 / bfloat16; None keeps the
    checkpoint's torch_dtype. vision_tower: a CLIP directory or known id when `mm_vision_tower`
    does not resolve, or when the checkpoint lacks the tower's weights.
    """
    _check_backend(backend)
    if dtype is not None and dtype not in DTYPES:
        raise ParrotError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    ckpt = Checkpoint.open(resolve_model_path(path), vision_tower)
    dtype = dtype or ckpt.config.torch_dtype
    if backend == "mlx":
        from .backends.mlx.api import MLXParrot

        return MLXParrot(ckpt, dtype)
    from .backends.torch_cuda.api import TorchParrot

    return TorchParrot(ckpt, dtype, device=backend)
