"""`parrot.load(..., backend="mlx")`: the MLX model behind the common interface."""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx
import numpy as np

from parrot.adapter import Adapter
from parrot.api import ParrotModel
from parrot.checkpoint import Checkpoint
from parrot.generation import SamplingParams

from .batch import generate_tokens_batch
from .generate import generate_tokens
from .loading import MX_DTYPES, load_mlx_model
from .lora import apply_adapter
from .mlxlm import BatchKVCache, make_prompt_cache


class MLXParrot(ParrotModel):
    backend = "mlx"

    def __init__(self, checkpoint: Checkpoint, dtype: str, adapter: Adapter | None = None):
        super().__init__(checkpoint, dtype)
        self.mx_dtype = MX_DTYPES[dtype]
        self.model = load_mlx_model(checkpoint, dtype)
        if adapter is not None:
            apply_adapter(self.model, adapter)
            self.adapter = adapter

    def image_features(self, pixels: np.ndarray | None) -> mx.array | None:
        """CLIP + projector output H_v [1, N, C] for preprocessed pixels (cacheable per image)."""
        if pixels is None:
            return None
        return self.model.encode_images(mx.array(np.asarray(pixels, dtype=np.float32)).astype(self.mx_dtype))

    def _logits(self, input_ids: list[int], pixels: np.ndarray | None) -> np.ndarray:
        emb = self.model.splice(input_ids, self.image_features(pixels))
        logits = self.model(emb)
        return np.array(logits[0].astype(mx.float32))

    def batch_logits(self, batch: list[tuple[list[int], np.ndarray | None]]) -> list[np.ndarray]:
        """Several prompts in one left-padded forward (mlx-lm's BatchKVCache builds the mask)."""
        rows = [self.model.splice(ids, self.image_features(p))[0] for ids, p in batch]
        T = max(r.shape[0] for r in rows)
        pads = [T - r.shape[0] for r in rows]
        emb = mx.stack([mx.concatenate([mx.zeros((n, r.shape[1]), r.dtype), r]) for r, n in zip(rows, pads)])
        cache = [BatchKVCache(pads) for _ in self.model.layers]
        logits = self.model(emb, cache=cache).astype(mx.float32)
        return [np.array(logits[i, n:]) for i, n in enumerate(pads)]

    # ---------------------------------------------------------------- incremental decoding
    def new_cache(self) -> list:
        """An empty KV cache (mlx-lm's) for `forward_embeddings`."""
        return make_prompt_cache(self.model.language_model)

    def expert_outputs(self, image_features: mx.array | None) -> mx.array | None:
        """The MoE experts' outputs for H_v (they do not depend on the text): cacheable per image."""
        return None if image_features is None else self.model.expert_outputs(image_features)

    def embed_prompt(
        self, input_ids: list[int], image_features: mx.array | None, experts: mx.array | None = None
    ) -> mx.array:
        """[1, T', C] prompt embeddings: the visual tokens computed once, from the prompt's text."""
        return self.model.splice(input_ids, image_features, experts=experts)

    def embed_tokens(self, ids: list[int]) -> mx.array:
        return self.model.embed_tokens(mx.array(ids))[None]

    def forward_embeddings(self, embeds: mx.array, cache=None) -> mx.array:
        """float32 logits [1, T, V] for embeddings that continue what `cache` holds (None: no cache)."""
        return self.model(embeds, cache=cache).astype(mx.float32)

    def cache_length(self, cache: list) -> int:
        return cache[0].offset

    def trim_cache(self, cache: list, n: int) -> None:
        """Drops the last n positions."""
        if n > 0:
            for c in cache:
                c.trim(n)

    # ---------------------------------------------------------------- generation
    def generate_tokens(self, embeds: mx.array, cache: list, params: SamplingParams) -> Iterator[int]:
        return generate_tokens(self.model, embeds, cache, params)

    def generate_tokens_batch(
        self, embeds: list[mx.array], params: list[SamplingParams], stop: frozenset[int]
    ) -> Iterator[list[tuple[int, int]]]:
        """Several prompts decoded together; per step, (request index, token) of the rows still running."""
        return generate_tokens_batch(self.model, embeds, params, stop)

    def evaluate(self, *arrays) -> None:
        mx.eval([a for a in arrays if a is not None])

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()

    def peak_memory(self) -> int:
        """Bytes since the last reset (mx.get_peak_memory: the CPU and Metal devices alike)."""
        return mx.get_peak_memory()
