"""Batched decoding on the torch backend: left-padded prefill, one step per token, rows leave when done.

Row i's prompt (T_i positions) sits at the right end of a [B, T] batch; its positions count from
0 at its first real token and the attention mask hides the padding, so each row computes what it
would alone. A row stops at a stop token or its max_tokens; finished rows are dropped from the
KV cache (`batch_select_indices`) so the others do not pay for them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

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
