"""Batched generation: each row of a batch answers exactly as it would alone (greedy), rows stop on their own."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import parrot
from conftest import BACKENDS, random_image, requires_torch
from parrot.errors import ParrotError
from parrot.inference.batch import Request, generate_batch
from parrot.inference.generation import SamplingParams
from parrot.storage.safetensors_io import CheckpointFiles, save_tensors
from parrot.testing import write_tiny_checkpoint

# (prompt, image index or None, max_tokens): different lengths, with and without images, mixed
ROWS = [
    ("What is in the picture?", 0, 24),
    ("Что изображено на картинке? Опишите подробно.", None, 20),
    ("这张图片里有什么？", 1, 24),
    ("Hi", None, 17),
    ("Describe the image in detail, please, with many words.", 0, 24),
    ("Resimde ne var?", 1, 16),
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    random_image(41, 27, seed=3).save(d / "a.png")
    random_image(33, 50, seed=5).save(d / "b.png")
    return d / "a.png", d / "b.png"


def requests(photos, rows=ROWS, **sampling) -> list[Request]:
    return [Request(p, None if i is None else photos[i], SamplingParams(n, **sampling)) for p, i, n in rows]


@pytest.fixture(scope="module")
def stopping_ckpt(tmp_path_factory, photos):
    """A tiny model whose <|im_end|> row of lm_head is 1.1x that of a token its answers use: some
    rows stop early (at different steps), others run to max_tokens."""
    import torch

    d = write_tiny_checkpoint(tmp_path_factory.mktemp("stopping") / "ckpt", seed=0)
    m = parrot.load(d, backend="cpu")
    eos, head = m.tokenizer.eos_id, m.model.lm_head.weight
    base = [m.generate(p, None if i is None else photos[i], max_tokens=n).tokens for p, i, n in ROWS]
    original = head.data.clone()
    for liked, _ in Counter(t for b in base for t in b[2:]).most_common(8):
        with torch.no_grad():
            head[eos] = 1.1 * original[liked]
        runs = [m.generate(p, None if i is None else photos[i], max_tokens=n) for p, i, n in ROWS]
        stops = {len(r.tokens) for r in runs if r.finish_reason == "stop"}
        if len(stops) >= 3 and any(r.finish_reason == "length" for r in runs):
            break
    else:
        pytest.fail("no token makes the tiny model stop at different steps")
    files = CheckpointFiles(d)
    w = {k: np.array(files.read(k)) for k in files.keys()}
    w["lm_head.weight"] = head.detach().numpy().copy()
    for f in d.glob("model*.safetensors*"):
        f.unlink()
    save_tensors(w, d)
    return d


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_greedy_tokens_equal_one_by_one(backend, stopping_ckpt, photos):
    model = parrot.load(stopping_ckpt, backend=backend, dtype="float32")
    alone = [model.generate(r.prompt, r.image, max_tokens=r.params.max_tokens) for r in requests(photos)]
    together = generate_batch(model, requests(photos))
    for (prompt, _, _), a, b in zip(ROWS, alone, together):
        assert b.tokens == a.tokens, prompt
        assert (b.text, b.finish_reason, b.prompt_tokens) == (a.text, a.finish_reason, a.prompt_tokens), prompt
        assert b.generation_tokens == a.generation_tokens
    # the batch really mixes rows that stop at different steps with rows that run to max_tokens
    assert len({len(a.tokens) for a in alone if a.finish_reason == "stop"}) >= 3
    assert any(a.finish_reason == "length" and len(a.tokens) >= 16 for a in alone)
    # batches of 3 then 1, through the model's method: same answers in the same order
    prompts, images = [p for p, _, _ in ROWS[:4]], [None if i is None else photos[i] for _, i, _ in ROWS[:4]]
    chunked = model.generate_batch(prompts, images, max_tokens=16, batch_size=3)
    one_by_one = [model.generate(p, im, max_tokens=16).tokens for p, im in zip(prompts, images)]
    assert [r.tokens for r in chunked] == one_by_one


@pytest.mark.parametrize("backend", BACKENDS)
def test_finished_rows_leave_the_batch(backend, stopping_ckpt, photos):
    """The backend's step lists shrink as rows finish; each row gets its tokens up to its own stop."""
    model = parrot.load(stopping_ckpt, backend=backend, dtype="float32")
    reqs = requests(photos)
    alone = [model.generate(r.prompt, r.image, max_tokens=r.params.max_tokens) for r in reqs]
    embeds = []
    for r in reqs:
        pixels = None if r.image is None else model.preprocess(r.image)
        ids = model.encode_prompt(r.prompt, pixels is not None)
        feats = None if pixels is None else model.image_features(pixels)
        embeds.append(model.embed_prompt(ids, feats, None if feats is None else model.expert_outputs(feats)))
    steps = list(model.generate_tokens_batch(embeds, [r.params for r in reqs], model.stop_ids))
    sizes = [len(s) for s in steps]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == len(reqs) and sizes[-1] >= 1
    assert len(steps) == max(a.generation_tokens for a in alone)
    for i, a in enumerate(alone):
        got = [t for s in steps for r, t in s if r == i]
        assert got == a.tokens + ([model.tokenizer.eos_id] if a.finish_reason == "stop" else [])


@requires_torch
def test_batched_sampling_with_seeds_equals_one_by_one(tiny_ckpt, photos):
    model = parrot.load(tiny_ckpt, backend="cpu")
    reqs = [Request(p, None if i is None else photos[i], SamplingParams(12, 0.8, 0.9, seed=s))
            for s, (p, i, _) in enumerate(ROWS[:4])]
    alone = [model.generate(r.prompt, r.image, 12, 0.8, 0.9, seed=r.params.seed) for r in reqs]
    together = generate_batch(model, reqs)
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [r.seed for r in together] == [0, 1, 2, 3]
    assert len({tuple(r.tokens) for r in together}) == 4


@requires_torch
def test_mixed_greedy_and_sampled_rows_in_one_batch(tiny_ckpt, photos):
    model = parrot.load(tiny_ckpt, backend="cpu")
    reqs = [Request(ROWS[0][0], photos[0], SamplingParams(10)),
            Request(ROWS[1][0], None, SamplingParams(10, 1.0, seed=7)),
            Request(ROWS[2][0], photos[1], SamplingParams(10))]
    together = generate_batch(model, reqs)
    assert together[0].tokens == model.generate(ROWS[0][0], photos[0], max_tokens=10).tokens
    assert together[1].tokens == model.generate(ROWS[1][0], None, 10, 1.0, seed=7).tokens
    assert together[2].tokens == model.generate(ROWS[2][0], photos[1], max_tokens=10).tokens
    assert (together[0].seed, together[1].seed) == (None, 7)


@requires_torch
def test_batch_errors_are_clear(tiny_ckpt, photos, tmp_path):
    model = parrot.load(tiny_ckpt, backend="cpu")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ParrotError, match="not an image"):
        generate_batch(model, [Request("a", photos[0]), Request("b", tmp_path / "notes.txt")])
    with pytest.raises(ParrotError, match="prompt must be a string"):
        generate_batch(model, [Request("a"), Request(None)])
    with pytest.raises(ParrotError, match="2 prompts but 1 images"):
        model.generate_batch(["a", "b"], [photos[0]])
    with pytest.raises(ParrotError, match="batch_size"):
        model.generate_batch(["a", "b"], batch_size=0)
    assert generate_batch(model, []) == []
