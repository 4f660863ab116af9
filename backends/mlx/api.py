"""`parrot.load(..., backend="mlx")`: the MLX model behind the common interface."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import mlx.core as mx
import numpy as np

from parrot.api import ParrotModel
from parrot.inference.generation import SamplingParams
from parrot.model.checkpoint import Checkpoint
from parrot.registry import BackendSpec
from parrot.training.adapter import Adapter

from .batch import MLXDecodeBatch, generate_tokens_batch
from .generate import generate_tokens
from .loading import MX_DTYPES, load_mlx_model
from .lora import apply_adapter
from .mlxlm import BatchKVCache, make_prompt_cache


class MLXParrot(ParrotModel):
    """The MLX backend: the contract (parrot.contract) on `ParrotForCausalLM`."""

    def __init__(self, checkpoint: Checkpoint, dtype: str, spec: BackendSpec, adapter: Adapter | None = None):
        super().__init__(checkpoint, dtype, spec)
        self.mx_dtype = MX_DTYPES[dtype]
        self.model = load_mlx_model(checkpoint, dtype)
        if adapter is not None:
            apply_adapter(self.model, adapter)
            self.adapter = adapter

    @classmethod
    def from_module(cls, model, checkpoint, dtype: str, spec: BackendSpec) -> MLXParrot:
        """A view of a model that lives elsewhere (a trainer's, for evaluation during training)."""
        self = cls.__new__(cls)
        ParrotModel.__init__(self, checkpoint, dtype, spec)
        self.mx_dtype = MX_DTYPES[dtype]
        self.model = model
        return self

    # ---------------------------------------------------------------- vision
    def image_features(self, pixels: np.ndarray) -> mx.array:
        return self.model.encode_images(mx.array(np.asarray(pixels, dtype=np.float32)).astype(self.mx_dtype))

    def expert_outputs(self, image_features: mx.array) -> mx.array | None:
        return self.model.expert_outputs(image_features)

    # ---------------------------------------------------------------- embeddings
    def embed_tokens(self, ids: Sequence[int]) -> mx.array:
        return self.model.embed_tokens(mx.array(list(ids)))[None]

    def embed_prompt(self, input_ids: Sequence[int], image_features: mx.array | None = None,
                     experts: mx.array | None = None) -> mx.array:
        plan = self.plan_prompt(list(input_ids), image_features is not None)
        return self.model.splice(plan, image_features, experts)

    # ---------------------------------------------------------------- the LLM
    def forward_embeddings(self, embeds: mx.array, cache=None, last_only: bool = False) -> mx.array:
        if last_only:
            return self.model.lm_logits(self.model.hidden_states(embeds, cache=cache)[:, -1:]).astype(mx.float32)
        return self.model(embeds, cache=cache).astype(mx.float32)

    def batch_logits(self, batch: Sequence[tuple[Sequence[int], np.ndarray | None]],
                     padding_side: str = "right") -> list[np.ndarray]:
        plan, feats = self.plan_batch(batch, padding_side)
        embeds = self.model.splice(plan, feats)
        # right padding needs only the causal mask; left padding: BatchKVCache masks it and offsets positions
        pads = (plan.shape[1] - plan.lengths).tolist()
        cache = [BatchKVCache(pads) for _ in self.model.layers] if padding_side == "left" else None
        logits = self.to_numpy(self.model(embeds, cache=cache))
        return [logits[i][plan.attention_mask[i]] for i in range(len(batch))]

    def new_cache(self) -> list:
        return make_prompt_cache(self.model.language_model)

    def cache_length(self, cache: list) -> int:
        return cache[0].offset

    def trim_cache(self, cache: list, n: int) -> None:
        if n > 0:
            for c in cache:
                c.trim(n)

    # ---------------------------------------------------------------- decoding
    def generate_tokens(self, embeds: mx.array, cache: list, params: SamplingParams) -> Iterator[int]:
        return generate_tokens(self.model, embeds, cache, params)

    def generate_tokens_batch(self, embeds: Sequence[mx.array], params: Sequence[SamplingParams],
                              stop: frozenset[int]) -> Iterator[list[tuple[int, int]]]:
        return generate_tokens_batch(self.model, list(embeds), list(params), stop)

    def new_decode_batch(self) -> MLXDecodeBatch:
        return MLXDecodeBatch(self.model)

    # ---------------------------------------------------------------- arrays and device
    def to_numpy(self, array: mx.array) -> np.ndarray:
        return np.array(array.astype(mx.float32))

    def evaluate(self, *arrays) -> None:
        mx.eval([a for a in arrays if a is not None])

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()

    def peak_memory(self) -> int:
        return mx.get_peak_memory()
