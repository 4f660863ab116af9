"""Performance fixes that are behaviour, not timing: the order of work in the decode loops."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import BACKENDS, requires_torch
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_cache_encodes_a_batch_of_images_at_once_as_one_by_one(backend, tiny_ckpt):
    """ImageCache.get_many (batched generation's vision step): one CLIP + projector + experts pass over the new
    images, the same encodings as `get` per image; repeats and cached images are not recomputed."""
    import parrot
    from parrot.inference.bench import synthetic_image
    from parrot.inference.generation import ImageCache

    model = parrot.load(tiny_ckpt, backend=backend)
    px = [model.preprocess(synthetic_image(model, seed=s)) for s in (1, 2, 3)]
    calls = []
    feats = model.image_features
    model.image_features = lambda p: calls.append(len(p)) or feats(p)
    cache = ImageCache(size=8)
    cache.get(model, px[2])
    got = cache.get_many(model, [px[0], px[1], px[0], px[2]])
    assert calls == [1, 2]  # px[2] alone, then px[0] and px[1] together
    assert [c for _, c in got] == [True, True, False, False]
    assert got[0][0] is got[2][0]
    for (enc, _), p in zip(got, [px[0], px[1], px[0], px[2]]):
        ref, _ = ImageCache(1).get(model, p)
        assert np.abs(model.to_numpy(enc.features) - model.to_numpy(ref.features)).max() < 1e-5
        assert np.abs(model.to_numpy(enc.experts) - model.to_numpy(ref.experts)).max() < 1e-5
