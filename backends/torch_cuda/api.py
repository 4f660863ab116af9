"""`parrot.load(..., backend="cpu" | "cuda")`: the torch model behind the common interface."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from parrot.api import ParrotModel
from parrot.inference.generation import SamplingParams, process_peak_rss
from parrot.model.checkpoint import Checkpoint
from parrot.registry import BackendSpec
from parrot.training.adapter import Adapter

from .batch import TorchDecodeBatch, generate_tokens_batch
from .generate import generate_tokens
from .loading import TORCH_DTYPES, load_torch_model


class TorchParrot(ParrotModel):
    """The torch backend (cpu, cuda): the contract (parrot.contract) on `ParrotForCausalLM`."""

    def __init__(self, checkpoint: Checkpoint, dtype: str, spec: BackendSpec, adapter: Adapter | None = None):
        super().__init__(checkpoint, dtype, spec)
        self.device = torch.device(spec.device)
        self.torch_dtype = TORCH_DTYPES[dtype]
        self.model = load_torch_model(checkpoint, spec.device, dtype, adapter=adapter)
        self.adapter = adapter

    @classmethod
    def from_module(cls, model, checkpoint, dtype: str, spec: BackendSpec) -> TorchParrot:
        """A view of a model that lives elsewhere (a trainer's, for evaluation during training)."""
        self = cls.__new__(cls)
        ParrotModel.__init__(self, checkpoint, dtype, spec)
        self.device = next(model.parameters()).device
        self.torch_dtype = TORCH_DTYPES[dtype]
        self.model = model
        return self

    def _tensor(self, a: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype)

    # ---------------------------------------------------------------- vision
    @torch.inference_mode()
    def image_features(self, pixels: np.ndarray) -> torch.Tensor:
        return self.model.encode_images(self._tensor(np.asarray(pixels, np.float32), self.torch_dtype))

    @torch.inference_mode()
    def expert_outputs(self, image_features: torch.Tensor) -> torch.Tensor | None:
        return self.model.expert_outputs(image_features)

    # ---------------------------------------------------------------- embeddings
    @torch.inference_mode()
    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        return self.model.embed_tokens(self._tensor(np.asarray([ids], np.int64)))

    @torch.inference_mode()
    def embed_prompt(self, input_ids: Sequence[int], image_features: torch.Tensor | None = None,
                     experts: torch.Tensor | None = None) -> torch.Tensor:
        plan = self.plan_prompt(list(input_ids), image_features is not None)
        return self.model.splice(plan, image_features, experts)

    # ---------------------------------------------------------------- the LLM
    @torch.inference_mode()
    def forward_embeddings(self, embeds: torch.Tensor, cache=None, last_only: bool = False) -> torch.Tensor:
        offset = cache.get_seq_length() if cache is not None else 0
        T = embeds.shape[1]
        pos = torch.arange(offset, offset + T, device=self.device)[None]
        mask = torch.ones((1, offset + T), dtype=torch.bool, device=self.device)
        h = self.model.hidden_states(embeds, mask, pos, cache=cache)
        return self.model.lm_logits(h[:, -1:] if last_only else h)

    @torch.inference_mode()
    def batch_logits(self, batch: Sequence[tuple[Sequence[int], np.ndarray | None]],
                     padding_side: str = "right") -> list[np.ndarray]:
        plan, feats = self.plan_batch(batch, padding_side)
        embeds = self.model.splice(plan, feats)
        mask, pos = self._tensor(plan.attention_mask), self._tensor(plan.position_ids)
        logits = self.model.lm_logits(self.model.hidden_states(embeds, mask, pos))
        return [self.to_numpy(logits[i][mask[i]]) for i in range(len(batch))]

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.model.config)

    def cache_length(self, cache) -> int:
        return cache.get_seq_length()

    def trim_cache(self, cache, n: int) -> None:
        if n > 0:
            cache.crop(-n)  # a negative count removes that many (transformers 4.4x and 5.x alike)

    # ---------------------------------------------------------------- decoding
    def generate_tokens(self, embeds: torch.Tensor, cache, params: SamplingParams) -> Iterator[int]:
        return generate_tokens(self, embeds, cache, params)

    def generate_tokens_batch(self, embeds: Sequence[torch.Tensor], params: Sequence[SamplingParams],
                              stop: frozenset[int]) -> Iterator[list[tuple[int, int]]]:
        return generate_tokens_batch(self, list(embeds), list(params), stop)

    def new_decode_batch(self) -> TorchDecodeBatch:
        return TorchDecodeBatch(self)

    # ---------------------------------------------------------------- arrays and device
    def to_numpy(self, array: torch.Tensor) -> np.ndarray:
        return array.detach().float().cpu().numpy()

    def evaluate(self, *arrays) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return process_peak_rss()
