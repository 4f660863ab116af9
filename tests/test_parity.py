"""The two backends compute the same function (fp32): logits, padded batches, cached decoding."""

from __future__ import annotations

import numpy as np
import pytest

import parrot
from conftest import BACKENDS, random_image, requires_mlx, requires_torch
from parrot.testing import TinySpec, write_tiny_checkpoint

PROMPTS = ["Describe the image in detail.", "这张图片里有什么？请用中文回答。", "Resimde ne var?"]


@pytest.fixture(scope="module")
def loaded(tiny_variant):
    return parrot.load(tiny_variant, backend="cpu"), parrot.load(tiny_variant, backend="mlx")


@requires_mlx
@requires_torch
def test_mlx_logits_match_torch(loaded):
    torch_model, mlx_model = loaded
    for i, prompt in enumerate(PROMPTS):
        pixels = torch_model.preprocess(random_image(23 + 9 * i, 41 - 5 * i, seed=i))
        ids = torch_model.encode_prompt(prompt, has_image=True)
        a, b = torch_model.logits(ids, pixels), mlx_model.logits(ids, pixels)
        assert a.shape == b.shape == (len(ids) - 1 + torch_model.num_visual_tokens, torch_model.config.vocab_size)
        assert a.std() > 0.5  # logits are O(1), so argmax and the tolerance mean something
        assert np.abs(a - b).max() <= 1e-4
        assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.99


@requires_mlx
@requires_torch
def test_text_only_logits_match(loaded):
    torch_model, mlx_model = loaded
    ids = torch_model.encode_prompt("Переведи на английский: кошка", has_image=False)
    a, b = torch_model.logits(ids), mlx_model.logits(ids)
    assert a.shape == (len(ids), torch_model.config.vocab_size)
    assert np.abs(a - b).max() <= 1e-4


@requires_mlx
@requires_torch
def test_parity_with_moe_bypassed(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "stage1", TinySpec(use_moe=False), seed=5)
    t, m = parrot.load(d, backend="cpu"), parrot.load(d, backend="mlx")
    pixels = t.preprocess(random_image(30, 17))
    ids = t.encode_prompt("What is this?", has_image=True)
    a, b = t.logits(ids, pixels), m.logits(ids, pixels)
    assert np.abs(a - b).max() <= 1e-4
    # with the MoE bypassed the visual tokens are H_v itself: the text no longer changes them
    ids2 = t.encode_prompt("A completely different question about colours", has_image=True)
    a2 = t.logits(ids2, pixels)
    n = t.num_visual_tokens
    p1, p2 = ids.index(parrot.IMAGE_TOKEN_INDEX), ids2.index(parrot.IMAGE_TOKEN_INDEX)
    assert p1 == p2
    np.testing.assert_allclose(a[p1:p1 + n], a2[p2:p2 + n], atol=1e-5)


@requires_torch
def test_moe_text_changes_visual_tokens(tiny_ckpt):
    """With the MoE on, the same image under a different prompt yields different visual tokens."""
    t = parrot.load(tiny_ckpt, backend="cpu")
    pixels = t.preprocess(random_image(30, 17))
    ids1, ids2 = t.encode_prompt("Describe it", True), t.encode_prompt("这是什么", True)
    p, n = ids1.index(parrot.IMAGE_TOKEN_INDEX), t.num_visual_tokens
    a1, a2 = t.logits(ids1, pixels), t.logits(ids2, pixels)
    assert np.abs(a1[p:p + n] - a2[p:p + n]).max() > 1e-3


def _batch(model):
    return [
        (model.encode_prompt("Describe the image.", True), model.preprocess(random_image(40, 25, 1))),
        (model.encode_prompt("hi", False), None),
        (model.encode_prompt("Что изображено на картинке? Опиши подробно.", True),
         model.preprocess(random_image(19, 33, 2))),
    ]


@requires_torch
@pytest.mark.parametrize("side", ["right", "left"])
def test_torch_padded_batch_matches_one_by_one(tiny_variant, side):
    t = parrot.load(tiny_variant, backend="cpu")
    batch = _batch(t)
    singles = [t.logits(ids, px) for ids, px in batch]
    for got, want in zip(t.batch_logits(batch, padding_side=side), singles):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4


@requires_mlx
def test_mlx_padded_batch_matches_one_by_one(tiny_ckpt):
    m = parrot.load(tiny_ckpt, backend="mlx")
    batch = _batch(m)
    singles = [m.logits(ids, px) for ids, px in batch]
    for got, want in zip(m.batch_logits(batch), singles):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4


def _cat(backend, a, b):
    if backend == "mlx":
        import mlx.core as mx

        return mx.concatenate([a, b], axis=1)
    import torch

    return torch.cat([a, b], dim=1)




@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_decoding_matches_full_forward(tiny_ckpt, backend):
    """KV-cached steps equal a full forward over prompt + generated tokens with the same visual tokens."""
    m = parrot.load(tiny_ckpt, backend=backend)
    ids = m.encode_prompt("Describe the image.", True)
    prompt = m.embed_prompt(ids, m.image_features(m.preprocess(random_image(28, 31, 4))))
    cache = m.new_cache()
    step_logits = [np.array(m.forward_embeddings(prompt, cache)[0, -1])]
    tokens = []
    for _ in range(10):
        tokens.append(int(step_logits[-1].argmax()))
        step_logits.append(np.array(m.forward_embeddings(m.embed_tokens([tokens[-1]]), cache)[0, -1]))
    full = np.array(m.forward_embeddings(_cat(backend, prompt, m.embed_tokens(tokens)))[0])
    T = prompt.shape[1]
    for k, got in enumerate(step_logits):
        assert np.abs(full[T - 1 + k] - got).max() <= 1e-4
    assert len(set(tokens)) > 1  # a real sequence, not one repeated token


@requires_torch
@requires_mlx
@pytest.mark.parametrize("key", ["type", "rope_type"])
def test_linear_rope_scaling_means_the_same_on_both_backends(tmp_path, key):
    """A config's rope_scaling {"type": "linear", "factor": 2} (the older key) scales RoPE on torch as on MLX."""
    import json

    ckpt = write_tiny_checkpoint(tmp_path / "m", seed=5)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["rope_scaling"] = {key: "linear", "factor": 2.0}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    image = random_image(30, 30)
    outs = {}
    for backend in ("cpu", "mlx"):
        m = parrot.load(ckpt, backend=backend)
        outs[backend] = m.logits(m.encode_prompt("Resimde ne var? " * 3, True), m.preprocess(image))
    assert np.abs(outs["cpu"] - outs["mlx"]).max() < 1e-4
    plain = parrot.load(write_tiny_checkpoint(tmp_path / "plain", seed=5), backend="cpu")
    unscaled = plain.logits(plain.encode_prompt("Resimde ne var? " * 3, True), plain.preprocess(image))
    assert np.abs(unscaled - outs["cpu"]).max() > 1e-3  # the scaling is applied
