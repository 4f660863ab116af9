"""Decoding with the KV cache on the torch backend (cpu, cuda): samplers and the token loop.

The first token is read back right after the prefill (no decode step inside the time to first token);
after it, the loop issues step n+1 before it reads token n back to the host (`.item()`), so on a GPU the
next forward is queued while Python handles the current token (mlx-lm's generate_step order).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from parrot.inference.generation import SamplingParams


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose probabilities sum to >= top_p (ties at its
    edge kept); the others get -inf. logits [B, V] float32."""
    probs = torch.softmax(logits, dim=-1)
    sorted_probs = torch.sort(probs, dim=-1, descending=True).values
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    inside = torch.where(mass_before < top_p, sorted_probs, torch.full_like(sorted_probs, float("inf")))
    threshold = inside.min(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


class Sampler:
    """Greedy argmax when temperature is 0; else temperature + top-p sampling from a seeded generator."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [1, V] float32 -> token [1] (stays on the device)."""
        if self.params.greedy:
            return logits.argmax(dim=-1)
        logits = logits / self.params.temperature
        if self.params.top_p < 1:
            logits = top_p_filter(logits, self.params.top_p)
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=self.generator)[:, 0]


@torch.inference_mode()
def generate_tokens(model, embeds: torch.Tensor, cache, params: SamplingParams) -> Iterator[int]:
    """Prefills `embeds` [1, T, C] after what `cache` holds, then yields up to max_tokens token ids.

    `model` is a TorchParrot. The first token is yielded as soon as the prefill gives it (time to first
    token = the prefill alone); from then on each token is fed back into the cache before it is yielded
    (so after the caller stops at <|im_end|>, the cache holds it too), the forward of token n+1 queued
    before token n is read back. A caller that stops right at the first token leaves it out of the
    cache (KVState.commit reads the cache's length, so that is consistent).
    """
    sampler = Sampler(params, model.device)

    def step(token: torch.Tensor) -> torch.Tensor:
        return sampler(model.forward_embeddings(model.model.embed_tokens(token[None]), cache, last_only=True)[:, -1])

    y = sampler(model.forward_embeddings(embeds, cache, last_only=True)[:, -1])
    yield int(y.item())
    if params.max_tokens < 2:
        return
    y = step(y)  # token 1; the cache now holds token 0
    for n in range(1, params.max_tokens):
        nxt = step(y) if n + 1 < params.max_tokens else None
        yield int(y.item())
        y = nxt
