"""What a backend provides: the array-level operations the shared code (generation, batching, chat
sessions, answering files, benchmarks, evaluation) calls on a loaded model, one signature each.

A backend subclasses `parrot.api.ParrotModel` (which implements the user-facing methods on top of
these) and implements every abstract method below; `tests/test_contract.py` checks that both backends
do, with these exact signatures. Arrays (`Array`) stay in the backend's own type (torch tensors, MLX
arrays) between calls; `to_numpy` brings one back. Shapes: B batch, T positions, C hidden size,
N visual tokens, V vocabulary, E experts. See docs/architecture.md, "The backend contract".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

Array = Any  # a backend array: torch.Tensor, mx.array, ...
Cache = Any  # a backend KV cache


class ModelBackend(ABC):
    """The operations a backend implements. Token ids are Python ints; -200 marks the image."""

    # ---------------------------------------------------------------- vision
    @abstractmethod
    def image_features(self, pixels: np.ndarray) -> Array:
        """CLIP + projector: float32 pixels [B, 3, H, W] -> H_v [B, N, C] (before the MoE)."""

    @abstractmethod
    def expert_outputs(self, image_features: Array) -> Array | None:
        """The MoE experts' outputs for H_v, [E, B, N, C]; None without an active MoE. They do not
        depend on the text, so they are cached per image."""

    # ---------------------------------------------------------------- embeddings
    @abstractmethod
    def embed_tokens(self, ids: Sequence[int]) -> Array:
        """Word embeddings [1, T, C] of text token ids."""

    @abstractmethod
    def embed_prompt(self, input_ids: Sequence[int], image_features: Array | None = None,
                     experts: Array | None = None) -> Array:
        """[1, T', C] prompt embeddings: the placeholder replaced by the visual tokens MoE(H_v), whose
        text context is every text token of the prompt (`parrot.model.splice` plans where they go).
        image_features [1, N, C]; experts: their cached `expert_outputs`."""

    # ---------------------------------------------------------------- the LLM
    @abstractmethod
    def forward_embeddings(self, embeds: Array, cache: Cache | None = None, last_only: bool = False) -> Array:
        """float32 logits [1, T, V] for embeddings [1, T, C] that continue what `cache` holds (None: no
        cache; the cache is updated in place); last_only: only the last position's, [1, 1, V]."""

    @abstractmethod
    def batch_logits(self, batch: Sequence[tuple[Sequence[int], np.ndarray | None]],
                     padding_side: str = "right") -> list[np.ndarray]:
        """Logits of several prompts (ids, pixels [1, 3, H, W] or None) in one padded forward: one
        float32 [T_i', V] array each, equal to each prompt's own `logits`."""

    @abstractmethod
    def new_cache(self) -> Cache:
        """An empty KV cache for `forward_embeddings` and `generate_tokens`."""

    @abstractmethod
    def cache_length(self, cache: Cache) -> int:
        """How many positions the cache holds."""

    @abstractmethod
    def trim_cache(self, cache: Cache, n: int) -> None:
        """Drops the last n positions (n >= 0)."""

    # ---------------------------------------------------------------- decoding
    @abstractmethod
    def generate_tokens(self, embeds: Array, cache: Cache, params: Any) -> Iterator[int]:
        """Prefills embeds [1, T, C] after what `cache` holds, then yields up to `params.max_tokens`
        token ids (parrot.inference.generation.SamplingParams: greedy, or seeded temperature + top-p). Each
        token is fed into the cache before it is yielded."""

    @abstractmethod
    def generate_tokens_batch(self, embeds: Sequence[Array], params: Sequence[Any],
                              stop: frozenset[int]) -> Iterator[list[tuple[int, int]]]:
        """Several prompts (each [1, T_i, C]) decoded together: per step, the (request index, token id)
        of every row still running; a row leaves at a `stop` token or its max_tokens."""

    @abstractmethod
    def new_decode_batch(self) -> DecodeBatch:
        """An empty `DecodeBatch`: continuous batching, requests join and leave between decode steps."""

    # ---------------------------------------------------------------- arrays and device
    @abstractmethod
    def to_numpy(self, array: Array) -> np.ndarray:
        """A float32 numpy copy (waits for the computation)."""

    @abstractmethod
    def evaluate(self, *arrays: Array | None) -> None:
        """Computes pending arrays now (MLX is lazy; CUDA is asynchronous); None entries are skipped."""

    @abstractmethod
    def reset_peak_memory(self) -> None:
        """Starts a new peak-memory measurement (where the device can)."""

    @abstractmethod
    def peak_memory(self) -> int:
        """Peak memory in bytes since the last reset (CPU torch: the process's peak RSS)."""


class DecodeBatch(ABC):
    """A decode batch that requests join and leave between steps (continuous batching, `parrot serve`).

    `add` prefills one prompt alone (exactly as one-by-one generation does) and samples its first token;
    the row then joins the batch, its token pending. `step` feeds every row's pending token through the
    LLM in one batched forward (left padding masked, each row at its own positions) and samples each
    row's next token. The caller decides when a row is done (a stop token, its max_tokens, a client
    that left) and calls `remove`. Greedy rows produce the tokens they would alone."""

    @abstractmethod
    def add(self, embeds: Array, params: Any) -> tuple[int, int]:
        """Prefills embeds [1, T, C] (params: SamplingParams); returns (the row's key, its first token)."""

    @abstractmethod
    def step(self) -> list[tuple[int, int]]:
        """One decode step of every row: (key, next token) each, in the order rows joined."""

    # the rows' bookkeeping, shared: `keys` (row keys in join order) and `samplers` (one per row) are kept by
    # the backend's `add` and `_reset`; `remove` drops a row from them and has the backend select its arrays
    keys: list[int]
    samplers: list[Any]

    def remove(self, key: int) -> None:
        """Drops a row (its KV cache is freed); unknown keys are ignored."""
        if key not in self.keys:
            return
        keep = [j for j, k in enumerate(self.keys) if k != key]
        if not keep:
            self._reset()
            return
        self._select_rows(keep)
        self.keys = [self.keys[j] for j in keep]
        self.samplers = [self.samplers[j] for j in keep]

    @abstractmethod
    def _reset(self) -> None:
        """Empties the batch (no rows, no cache)."""

    @abstractmethod
    def _select_rows(self, keep: list[int]) -> None:
        """Keeps only rows `keep` (indices, in order, at least one) of the cache and the per-row arrays."""

    def __len__(self) -> int:
        """How many rows the batch holds."""
        return len(self.keys)


def contract_methods() -> list[str]:
    """The names of the methods every backend implements, in declaration order."""
    return [name for name, f in vars(ModelBackend).items() if getattr(f, "__isabstractmethod__", False)]
