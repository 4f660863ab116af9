"""Performance fixes that are behaviour, not timing: the order of work in the decode loops."""

from __future__ import annotations

import numpy as np

from conftest import requires_torch
from parrot.inference.generation import SamplingParams


@requires_torch
def test_torch_first_token_comes_before_any_decode_step(tiny_ckpt):
    """Time to first token is the prefill alone: generate_tokens yields token 0 after one forward (the
    prefill), not after it has also run the decode step of token 1; the tokens are those of a loop that
    runs one forward per token."""
    import torch

    import parrot

    model = parrot.load(tiny_ckpt, backend="cpu")
    ids = model.tokenizer.encode("hello there, how are you")
    calls = []
    forward = model.forward_embeddings
    model.forward_embeddings = lambda *a, **k: calls.append(1) or forward(*a, **k)
    cache = model.new_cache()
    steps = model.generate_tokens(model.embed_tokens(ids), cache, SamplingParams(max_tokens=5))
    first = next(steps)
    assert len(calls) == 1  # the prefill only
    rest = list(steps)
    assert len(calls) == 5 and len(rest) == 4
    assert model.cache_length(cache) == len(ids) + 4  # every token but the last fed back

    # reference: one forward per token, greedy
    model.forward_embeddings = forward
    cache = model.new_cache()
    emb, ref = model.embed_tokens(ids), []
    with torch.inference_mode():
        for _ in range(5):
            tok = int(np.argmax(model.to_numpy(model.forward_embeddings(emb, cache, last_only=True))[0, -1]))
            ref.append(tok)
            emb = model.embed_tokens([tok])
    assert [first, *rest] == ref
