"""Decoding with the KV cache on MLX: samplers and the token loop, in mlx-lm's generate_step order.

Prefill runs in chunks whose logits are never computed (only the cache is evaluated); then each
step builds the graph of token n+1 and starts it with `mx.async_eval` before reading token n
back (`.item()`), so the device never waits for Python. One host sync per token, on its own stream.
On Metal, generation runs under `wired_limit` (weights kept resident), as mlx-lm does.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import mlx.core as mx

from parrot.inference.generation import SamplingParams

from .mlxlm import wired_limit

PREFILL_STEP = 2048
generation_stream = mx.new_thread_local_stream(mx.default_device())


def top_p_filter(logits: mx.array, top_p: float) -> mx.array:
    """Keeps the smallest set of most likely tokens whose probabilities sum to >= top_p (ties at its
    edge kept); the others get -inf. logits [B, V] float32."""
    probs = mx.softmax(logits, axis=-1, precise=True)
    sorted_probs = -mx.sort(-probs, axis=-1)
    mass_before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
    inside = mx.where(mass_before < top_p, sorted_probs, mx.inf)
    threshold = mx.min(inside, axis=-1, keepdims=True)
    return mx.where(probs < threshold, -mx.inf, logits)


@lru_cache(maxsize=32)
def sample_step(temperature: float, top_p: float):
    """(logits [1, V], key) -> (token [1], next key): the key split, temperature, top-p filter and categorical
    draw as one mx.compile'd function per setting (traced once; its elementwise parts fused)."""
    def sample(logits: mx.array, key: mx.array) -> tuple[mx.array, mx.array]:
        keys = mx.random.split(key)
        logits = logits / temperature
        if top_p < 1:
            logits = top_p_filter(logits, top_p)
        return mx.random.categorical(logits, key=keys[1]), keys[0]

    return mx.compile(sample)


class Sampler:
    """Greedy argmax when temperature is 0; else temperature + top-p sampling with an explicit,
    seeded PRNG key (split each step; the global MLX random state is left alone)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.key = None if params.greedy else mx.random.key(params.seed)
        self.sample = None if params.greedy else sample_step(params.temperature, params.top_p)

    def __call__(self, logits: mx.array) -> mx.array:
        """logits [1, V] float32 -> token [1] (lazy)."""
        if self.params.greedy:
            return mx.argmax(logits, axis=-1)
        token, self.key = self.sample(logits, self.key)
        return token


def prefill(lm, cache: list, embeds: mx.array) -> mx.array:
    """Runs all but the last position of `embeds` [B, T, C] into the cache, in chunks of PREFILL_STEP whose
    logits are never computed (only the cache is evaluated); returns the last position, [B, 1, C]."""
    while embeds.shape[1] > 1:
        n = min(PREFILL_STEP, embeds.shape[1] - 1)
        lm(None, cache=cache, input_embeddings=embeds[:, :n])
        mx.eval([c.state for c in cache])
        embeds = embeds[:, n:]
    return embeds


def generate_tokens(model, embeds: mx.array, cache: list, params: SamplingParams) -> Iterator[int]:
    """Prefills `embeds` [1, T, C] after what `cache` holds, then yields up to max_tokens token ids.

    `model` is the MLX `ParrotForCausalLM`. Each token is fed back into the cache before it is yielded
    (so after the caller stops at <|im_end|>, the cache holds it too).
    """
    lm = model.language_model
    sampler = Sampler(params)

    def step(tokens: mx.array | None, emb: mx.array | None = None) -> mx.array:
        logits = lm(tokens, cache=cache, input_embeddings=emb)
        return sampler(logits[:, -1, :].astype(mx.float32))

    with wired_limit(model, [generation_stream]):
        with mx.stream(generation_stream):
            y = step(None, prefill(lm, cache, embeds))
        mx.async_eval(y)
        for n in range(params.max_tokens):
            if n + 1 < params.max_tokens:
                with mx.stream(generation_stream):
                    next_y = step(y[None])
                mx.async_eval(next_y)
            yield y.item()
            if n % 256 == 255:
                mx.clear_cache()
            y = next_y if n + 1 < params.max_tokens else None
