"""Batched decoding on the torch backend: left-padded prefill, one step per token, rows leave when done.

Row i's prompt (T_i positions) sits at the right end of a [B, T] batch; its positions count from
0 at its first real token and the attention mask hides the padding, so each row computes what it
would alone. A row stops at a stop token or its max_tokens; finished rows are dropped from the
KV cache (`batch_select_indices`) so the others do not pay for them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from parrot.contract import DecodeBatch
from parrot.inference.generation import SamplingParams, advance_rows

from .generate import Sampler


def sample_rows(samplers: list[Sampler], rows: list[int], logits: torch.Tensor) -> torch.Tensor:
    """One token per row of logits [b, V] (row j belongs to request rows[j])."""
    if all(samplers[r].params.greedy for r in rows):
        return logits.argmax(dim=-1)
    return torch.cat([samplers[r](logits[j:j + 1]) for j, r in enumerate(rows)])


@torch.inference_mode()
def generate_tokens_batch(
    model, embeds: list[torch.Tensor], params: list[SamplingParams], stop: frozenset[int]
) -> Iterator[list[tuple[int, int]]]:
    """Prefills the prompts `embeds` (each [1, T_i, C]) together, then yields, per decode step, the
    (request index, token id) of every row still running. `model` is a TorchParrot."""
    lm, dev = model.model, model.device
    lengths = torch.tensor([e.shape[1] for e in embeds], device=dev)
    B, T, C = len(embeds), int(lengths.max()), embeds[0].shape[-1]
    x = embeds[0].new_zeros(B, T, C)
    for i, e in enumerate(embeds):
        x[i, T - e.shape[1]:] = e[0]
    pad = (T - lengths)[:, None]
    ar = torch.arange(T, device=dev)[None]
    mask = ar >= pad
    cache = model.new_cache()
    h = lm.hidden_states(x, mask, (ar - pad).clamp(min=0), cache=cache)
    samplers = [Sampler(p, dev) for p in params]
    rows = list(range(B))
    counts = [0] * B
    y = sample_rows(samplers, rows, lm.lm_logits(h[:, -1]))
    pos = lengths.clone()
    while True:
        step, keep = advance_rows(rows, y.tolist(), counts, params, stop)
        yield step
        if not keep:
            return
        if len(keep) < len(rows):
            idx = torch.tensor(keep, device=dev)
            cache.batch_select_indices(idx)
            mask, y, pos = mask[idx], y[idx], pos[idx]
            rows = [rows[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        h = lm.hidden_states(lm.embed_tokens(y[:, None]), mask, pos[:, None], cache=cache)
        pos = pos + 1
        y = sample_rows(samplers, rows, lm.lm_logits(h[:, -1]))


class TorchDecodeBatch(DecodeBatch):
    """Continuous batching on torch (parrot.contract.DecodeBatch): a joining prompt is prefilled alone in
    its own DynamicCache (as `generate_tokens` does), then its keys and values are left-padded to the
    batch's length (or the batch's to its) and stacked in; the attention mask hides the padding and each
    row keeps its own positions. A leaving row is dropped, and the padding every row shares is cut."""

    def __init__(self, model):
        self.model, self.lm, self.dev = model, model.model, model.device
        self._reset()
        self._next = 0

    def _reset(self) -> None:
        self.cache = None  # a DynamicCache holding [B, H, T, D] per layer
        self.mask = self.pos = self.y = None  # [B, T] bool, [B] next position, [B] pending token
        self.keys: list[int] = []
        self.samplers: list[Sampler] = []

    @torch.inference_mode()
    def add(self, embeds: torch.Tensor, params: SamplingParams) -> tuple[int, int]:
        cache = self.model.new_cache()
        sampler = Sampler(params, self.dev)
        y = sampler(self.model.forward_embeddings(embeds, cache, last_only=True)[:, -1])
        L = int(embeds.shape[1])
        key, self._next = self._next, self._next + 1
        if self.cache is None:
            self.cache, self.mask = cache, torch.ones((1, L), dtype=torch.bool, device=self.dev)
            self.pos, self.y = torch.tensor([L], device=self.dev), y
        else:
            T = self.mask.shape[1]
            width = max(T, L)
            for mine, new in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([_left_pad(mine.keys, width - T), _left_pad(new.keys, width - L)])
                mine.values = torch.cat([_left_pad(mine.values, width - T), _left_pad(new.values, width - L)])
            row = torch.arange(width, device=self.dev)[None] >= width - L
            self.mask = torch.cat([_left_pad(self.mask, width - T, dim=1), row])
            self.pos = torch.cat([self.pos, self.pos.new_tensor([L])])
            self.y = torch.cat([self.y, y])
        self.keys.append(key)
        self.samplers.append(sampler)
        return key, int(y.item())

    @torch.inference_mode()
    def step(self) -> list[tuple[int, int]]:
        if not self.keys:
            return []
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.keys), 1)], dim=1)
        h = self.lm.hidden_states(self.lm.embed_tokens(self.y[:, None]), self.mask, self.pos[:, None],
                                  cache=self.cache)
        self.pos = self.pos + 1
        self.y = sample_rows(self.samplers, list(range(len(self.keys))), self.lm.lm_logits(h[:, -1]))
        return list(zip(self.keys, self.y.tolist()))

    @torch.inference_mode()
    def _select_rows(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, device=self.dev)
        self.cache.batch_select_indices(idx)
        self.mask, self.pos, self.y = self.mask[idx], self.pos[idx], self.y[idx]
        shared = int(self.mask.any(dim=0).to(torch.int8).argmax())  # leading columns that are padding in every row
        if shared:
            self.mask = self.mask[:, shared:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., shared:, :], layer.values[..., shared:, :]


def _left_pad(x: torch.Tensor, n: int, dim: int = -2) -> torch.Tensor:
    """x with n zeros (False) before its entries along `dim`."""
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)
