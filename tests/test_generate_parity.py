"""Generation on both backends: greedy parity, cached decoding vs full forwards, streaming, stopping."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import parrot
from conftest import BACKENDS, HAS_MLX, random_image, requires_mlx, requires_torch
from parrot.storage.safetensors_io import CheckpointFiles, save_tensors
from parrot.testing import write_tiny_checkpoint

PROMPTS = [
    ("What is in the picture?", True),
    ("这张图片里有什么？请用中文回答。", True),
    ("Describe the image in detail.", True),
    ("Что изображено на картинке?", False),
]


def to_np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    import mlx.core as mx

    return np.array(x.astype(mx.float32))


def concat(a, b):
    if hasattr(a, "detach"):
        import torch

        return torch.cat([a, b], dim=1)
    import mlx.core as mx

    return mx.concatenate([a, b], axis=1)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "photo.png"
    random_image(41, 27, seed=3).save(p)
    return p


@pytest.fixture(scope="module")
def eos_prone_ckpt(tmp_path_factory, photo):
    """A tiny model whose <|im_end|> logit is 1.2x that of a token it likes: answers stop early."""
    d = write_tiny_checkpoint(tmp_path_factory.mktemp("eos") / "ckpt", seed=0)
    liked = parrot.load(d, backend="cpu").generate(PROMPTS[0][0], photo, max_tokens=4).tokens[-1]
    files = CheckpointFiles(d)
    w = {k: np.array(files.read(k)) for k in files.keys()}
    eos = parrot.load(d, backend="cpu").tokenizer.eos_id
    w["lm_head.weight"][eos] = 1.2 * w["lm_head.weight"][liked]
    for f in d.glob("model*.safetensors*"):
        f.unlink()
    save_tensors(w, d)
    return d


def greedy_runs(model, photo, n=32):
    return [model.generate(p, photo if img else None, max_tokens=n) for p, img in PROMPTS]


@requires_mlx
@requires_torch
def test_mlx_greedy_tokens_match_torch(tiny_variant, photo):
    torch_runs = greedy_runs(parrot.load(tiny_variant, backend="cpu", dtype="float32"), photo)
    mlx_runs = greedy_runs(parrot.load(tiny_variant, backend="mlx", dtype="float32"), photo)
    for (prompt, _), t, m in zip(PROMPTS, torch_runs, mlx_runs):
        assert m.tokens == t.tokens, prompt
        assert m.text == t.text and m.finish_reason == t.finish_reason
    assert any(len(r.tokens) == 32 and r.finish_reason == "length" for r in torch_runs)


@requires_mlx
@requires_torch
def test_mlx_greedy_tokens_match_torch_when_answers_stop_early(eos_prone_ckpt, photo):
    torch_runs = greedy_runs(parrot.load(eos_prone_ckpt, backend="cpu"), photo)
    mlx_runs = greedy_runs(parrot.load(eos_prone_ckpt, backend="mlx"), photo)
    assert [r.tokens for r in mlx_runs] == [r.tokens for r in torch_runs]
    stopped = [r for r in torch_runs if r.finish_reason == "stop"]
    assert stopped and all(len(r.tokens) < 32 and r.generation_tokens == len(r.tokens) + 1 for r in stopped)
    eos = parrot.load(eos_prone_ckpt, backend="cpu").tokenizer.eos_id
    assert all(eos not in r.tokens for r in torch_runs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ckpt", ["tiny", "eos_prone"])
def test_cached_generation_equals_full_forwards_with_prompt_visual_tokens(backend, ckpt, request, photo):
    """Each generated token is the argmax of a cache-free forward over prompt + tokens so far, the
    visual tokens computed once from the prompt's text (generated tokens never change them)."""
    path = request.getfixturevalue("tiny_ckpt" if ckpt == "tiny" else "eos_prone_ckpt")
    m = parrot.load(path, backend=backend)
    for prompt, img in PROMPTS[:3]:
        r = m.generate(prompt, photo if img else None, max_tokens=12)
        ids = m.encode_prompt(prompt, img)
        emb = m.embed_prompt(ids, m.image_features(m.preprocess(photo)) if img else None)
        steps = r.tokens + ([m.tokenizer.eos_id] if r.finish_reason == "stop" else [])
        for t, want in enumerate(steps):
            x = concat(emb, m.embed_tokens(steps[:t])) if t else emb
            logits = to_np(m.forward_embeddings(x))[0, -1]
            assert int(np.argmax(logits)) == want, (prompt, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_pieces_concatenate_to_text(backend, tiny_ckpt, photo):
    m = parrot.load(tiny_ckpt, backend=backend)
    for prompt, img in PROMPTS:
        image = photo if img else None
        s = m.stream(prompt, image, max_tokens=24)
        pieces = list(s)
        r = m.generate(prompt, image, max_tokens=24)
        assert "".join(pieces) == r.text == s.result.text
        assert s.result.tokens == r.tokens
        assert r.text == m.tokenizer.decode(r.tokens)  # the tokenizer's own decoding, independent


@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_figures_are_filled_in(backend, tiny_ckpt, photo):
    m = parrot.load(tiny_ckpt, backend=backend)
    r = m.generate("What is in the picture?", photo, max_tokens=8)
    ids = m.encode_prompt("What is in the picture?", True)
    assert r.prompt_tokens == r.prefill_tokens == len(ids) - 1 + m.num_visual_tokens
    assert r.generation_tokens == len(r.tokens) == 8 and r.finish_reason == "length"
    assert r.time_to_first_token > r.vision_time > 0 and r.prompt_tps > 0 and r.generation_tps > 0
    assert r.peak_memory > 0
    again = m.generate("What is in the picture?", photo, max_tokens=8)
    assert again.vision_time == 0 and again.tokens == r.tokens  # the image's vision outputs are cached
    assert "Prompt:" in r.summary() and "Peak memory:" in r.summary()


def test_image_can_be_a_path_or_a_pil_image(tiny_ckpt, photo):
    from PIL import Image

    m = parrot.load(tiny_ckpt, backend="mlx" if HAS_MLX else "cpu")
    a = m.generate("What is in the picture?", photo, max_tokens=6)
    b = m.generate("What is in the picture?", Image.open(photo), max_tokens=6)
    c = m.generate("What is in the picture?", str(photo), max_tokens=6)
    assert a.tokens == b.tokens == c.tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_im_end_stops_answers_as_in_the_official_runner(backend, tiny_ckpt, photo, tmp_path):
    """generation_config.json's extra eos ids do not stop an answer: the official runner passes
    eos_token_id=<|im_end|>, which overrides them."""
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, d)
    full = parrot.load(d, backend=backend).generate(PROMPTS[0][0], photo, max_tokens=16)
    stop = full.tokens[5]
    eos = parrot.load(d, backend=backend).tokenizer.eos_id
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, stop], "pad_token_id": 0}))
    r = parrot.load(d, backend=backend).generate(PROMPTS[0][0], photo, max_tokens=16)
    assert r.tokens == full.tokens


@requires_mlx
def test_mlx_layout_directory_answers_like_the_official_one(eos_prone_ckpt, photo, tmp_path):
    from parrot.convert.core import convert_checkpoint

    mlx_dir = convert_checkpoint(eos_prone_ckpt, tmp_path / "mlx", to="mlx").path
    official = parrot.load(eos_prone_ckpt, backend="mlx")
    converted = parrot.load(mlx_dir, backend="mlx")
    for prompt, img in PROMPTS:
        image = photo if img else None
        assert converted.generate(prompt, image, max_tokens=16).tokens == official.generate(
            prompt, image, max_tokens=16).tokens
