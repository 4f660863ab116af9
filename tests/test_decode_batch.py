"""Continuous batching (parrot.contract.DecodeBatch, used by `parrot serve`): rows join and leave between
decode steps, and each row's tokens are the ones it gets alone (greedy and seeded sampling), on both
backends; the MLX rows equal the torch rows."""

from __future__ import annotations

import pytest

import parrot
from conftest import BACKENDS, random_image, requires_mlx, requires_torch
from parrot.inference.generation import ImageCache, SamplingParams, generate_stream

# (step it joins at, prompt, image index or None, max_tokens, temperature, seed)
SCHEDULE = [
    (0, "What is in the picture?", 0, 9, 0.0, None),
    (0, "Hi", None, 4, 0.0, None),
    (2, "这张图片里有什么？请详细描述。", 1, 8, 0.0, None),
    (3, "Describe it, with many many words please, in Portuguese.", 0, 6, 0.9, 7),
    (5, "Resimde ne var?", None, 7, 0.0, None),
    (11, "Late", None, 3, 0.0, None),  # joins an empty batch after everyone left
]
CANCEL = {1: 2}  # row 1 leaves after 2 tokens, as a client that disconnects (alone it would run 4)


@pytest.fixture(scope="module")
def photos():
    return random_image(41, 27, seed=3), random_image(33, 50, seed=5)


def params(row) -> SamplingParams:
    return SamplingParams(row[3], row[4], 1.0, row[5])


def alone(model, photos) -> list[list[int]]:
    out = []
    for row in SCHEDULE:
        image = None if row[2] is None else photos[row[2]]
        ids = model.encode_prompt(row[1], image is not None)
        out.append(generate_stream(model, ids, image, params(row), stop=frozenset()).consume().tokens)
    return out


def together(model, photos) -> tuple[list[list[int]], list[int]]:
    """Runs SCHEDULE through one DecodeBatch; also returns the batch size at every step."""
    batch, images = model.new_decode_batch(), ImageCache(4)
    tokens: dict[int, list[int]] = {}
    owner: dict[int, int] = {}
    sizes = []
    step = 0
    while step <= max(r[0] for r in SCHEDULE) or len(batch):
        for i, row in enumerate(SCHEDULE):
            if row[0] == step:
                feats = experts = None
                if row[2] is not None:
                    enc, _ = images.get(model, model.preprocess(photos[row[2]]))
                    feats, experts = enc.features, enc.experts
                embeds = model.embed_prompt(model.encode_prompt(row[1], feats is not None), feats, experts)
                key, first = batch.add(embeds, params(row))
                tokens[i], owner[key] = [first], i
        for key in list(owner):
            i = owner[key]
            if len(tokens[i]) >= CANCEL.get(i, SCHEDULE[i][3]):
                batch.remove(key)
                del owner[key]
        sizes.append(len(batch))
        for key, token in batch.step():
            tokens[owner[key]].append(token)
        step += 1
    batch.remove(12345)  # unknown keys are ignored
    return [tokens[i] for i in range(len(SCHEDULE))], sizes


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_join_and_leave_get_their_one_by_one_tokens(backend, tiny_ckpt, photos):
    model = parrot.load(tiny_ckpt, backend=backend, dtype="float32")
    ref = alone(model, photos)
    got, sizes = together(model, photos)
    for i, (a, b) in enumerate(zip(ref, got)):
        n = CANCEL.get(i, len(a))
        assert len(b) == n and b == a[:n], SCHEDULE[i][1]
    assert max(sizes) >= 4 and 0 in sizes  # really batched, and the batch emptied and refilled
    assert len(set(map(tuple, ref))) == len(ref)  # the rows differ (a mix-up would show)


@requires_torch
@requires_mlx
def test_mlx_decode_batch_equals_torch(tiny_ckpt, photos):
    got = {b: together(parrot.load(tiny_ckpt, backend=b, dtype="float32"), photos)[0] for b in ("cpu", "mlx")}
    greedy = [i for i, r in enumerate(SCHEDULE) if r[4] == 0]
    assert [got["mlx"][i] for i in greedy] == [got["cpu"][i] for i in greedy]
