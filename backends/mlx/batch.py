"""Batched decoding on MLX with mlx-lm's BatchKVCache: left-padded prefill, rows leave when done.

BatchKVCache keeps each row's left padding: it masks the padding and gives each row its own
RoPE offset, so a row computes what it would alone. Finished rows are filtered out of the cache.
The model and its weights are shared with one-by-one generation (nothing is reloaded or compiled
per request). One host sync per step (the rows still running are known before the next step).
"""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx

from parrot.contract import DecodeBatch
from parrot.inference.generation import SamplingParams, advance_rows

from .generate import Sampler, generation_stream, prefill
from .mlxlm import BatchKVCache, make_prompt_cache, wired_limit


def sample_rows(samplers: list[Sampler], rows: list[int], logits: mx.array) -> mx.array:
    """One token per row of logits [b, V] (row j belongs to request rows[j])."""
    if all(samplers[r].params.greedy for r in rows):
        return mx.argmax(logits, axis=-1)
    return mx.concatenate([samplers[r](logits[j:j + 1]) for j, r in enumerate(rows)])


def generate_tokens_batch(
    model, embeds: list[mx.array], params: list[SamplingParams], stop: frozenset[int]
) -> Iterator[list[tuple[int, int]]]:
    """Prefills the prompts `embeds` (each [1, T_i, C]) together, then yields, per decode step, the
    (request index, token id) of every row still running. `model` is the MLX `ParrotForCausalLM`."""
    lm = model.language_model
    T = max(e.shape[1] for e in embeds)
    pads = [T - e.shape[1] for e in embeds]
    x = mx.concatenate(
        [mx.concatenate([mx.zeros((1, p, e.shape[2]), e.dtype), e], axis=1) if p else e for e, p in zip(embeds, pads)]
    )
    cache = [BatchKVCache(pads) for _ in lm.layers]
    samplers = [Sampler(p) for p in params]
    rows = list(range(len(embeds)))
    counts = [0] * len(embeds)
    with wired_limit(model, [generation_stream]):
        with mx.stream(generation_stream):
            x = prefill(lm, cache, x)
            y = sample_rows(samplers, rows, lm(None, cache=cache, input_embeddings=x)[:, -1].astype(mx.float32))
        while True:
            step, keep = advance_rows(rows, y.tolist(), counts, params, stop)
            yield step
            if not keep:
                return
            with mx.stream(generation_stream):
                if len(keep) < len(rows):
                    idx = mx.array(keep)
                    for c in cache:
                        c.filter(idx)
                    y = y[idx]
                    rows = [rows[j] for j in keep]
                logits = lm(y[:, None], cache=cache)[:, -1].astype(mx.float32)
                y = sample_rows(samplers, rows, logits)


class MLXDecodeBatch(DecodeBatch):
    """Continuous batching on MLX (parrot.contract.DecodeBatch), as mlx-lm's BatchGenerator does it: a
    joining prompt is prefilled alone in its own KV cache (as `generate_tokens` does), turned into a
    one-row BatchKVCache (`merge`) and appended (`extend`, which left-pads the shorter side); a leaving
    row is filtered out (`filter` also cuts the padding every row shares). `model` is `ParrotForCausalLM`."""

    def __init__(self, model):
        self.model, self.lm = model, model.language_model
        self._reset()
        self._next = self._steps = 0

    def _reset(self) -> None:
        self.cache: list | None = None  # one BatchKVCache per layer
        self.y = None  # [B] pending tokens
        self.keys: list[int] = []
        self.samplers: list[Sampler] = []

    def add(self, embeds: mx.array, params: SamplingParams) -> tuple[int, int]:
        cache = make_prompt_cache(self.lm)
        sampler = Sampler(params)
        with mx.stream(generation_stream):
            x = prefill(self.lm, cache, embeds)
            y = sampler(self.lm(None, cache=cache, input_embeddings=x)[:, -1].astype(mx.float32))
            rows = [BatchKVCache.merge([c]) for c in cache]
            if self.cache is None:
                self.cache, self.y = rows, y
            else:
                for mine, new in zip(self.cache, rows):
                    mine.extend(new)
                self.y = mx.concatenate([self.y, y])
            mx.eval(self.y, [c.state for c in self.cache])
        key, self._next = self._next, self._next + 1
        self.keys.append(key)
        self.samplers.append(sampler)
        return key, y.item()

    def step(self) -> list[tuple[int, int]]:
        if not self.keys:
            return []
        with mx.stream(generation_stream):
            logits = self.lm(self.y[:, None], cache=self.cache)[:, -1].astype(mx.float32)
            self.y = sample_rows(self.samplers, list(range(len(self.keys))), logits)
        out = list(zip(self.keys, self.y.tolist()))
        self._steps += 1
        if self._steps % 256 == 0:  # as generate_tokens: return freed buffers in a long-running batch
            mx.clear_cache()
        return out

    def _select_rows(self, keep: list[int]) -> None:
        idx = mx.array(keep)
        with mx.stream(generation_stream):
            for c in self.cache:
                c.filter(idx)
            self.y = self.y[idx]
