"""Multi-turn chat: official semantics per turn, what is cached and reused, the REPL's commands."""

from __future__ import annotations

import numpy as np
import pytest

import parrot
from conftest import BACKENDS, random_image
from parrot.cli.repl import run_repl
from parrot.constants import IMAGE_TOKEN_INDEX

Q1, Q2, Q3 = "What is in the picture?", "Describe the image in detail.", "这张图片里有什么？"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    random_image(41, 27, seed=3).save(d / "a.png")
    random_image(30, 44, seed=4).save(d / "b.png")
    return d / "a.png", d / "b.png"


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, tiny_ckpt):
    return parrot.load(tiny_ckpt, backend=request.param)


def count_vision_calls(model, monkeypatch) -> list:
    calls = []
    real = model.image_features

    def counted(pixels):
        calls.append(1)
        return real(pixels)

    monkeypatch.setattr(model, "image_features", counted)
    return calls


def test_second_turn_equals_fresh_generation_with_the_history(model, images):
    """Turn 2 reuses caches, yet answers exactly as a fresh run over the whole conversation does
    (the MoE recomputed from all of turn 2's text)."""
    s = model.chat(images[0])
    r1 = s.ask(Q1, max_tokens=12).consume()
    r2 = s.ask(Q2, max_tokens=12).consume()
    assert s.history == [(Q1, r1.text.strip()), (Q2, r2.text.strip())]
    fresh = model.generate(Q2, images[0], max_tokens=12, history=[(Q1, r1.text.strip())])
    assert r2.tokens == fresh.tokens
    ids2 = model.encode_prompt(Q2, True, history=[(Q1, r1.text.strip())])
    prefix = ids2.index(IMAGE_TOKEN_INDEX)  # system prompt + "<|im_start|>user\n": reused from turn 1
    assert r1.prefill_tokens == r1.prompt_tokens
    assert r2.prompt_tokens == fresh.prompt_tokens and r2.prefill_tokens == r2.prompt_tokens - prefix


def test_visual_tokens_follow_the_conversation_text(model, images):
    """Official semantics: the MoE attends over all prompt text, so turn 2's visual tokens differ."""
    pixels = model.preprocess(images[0])
    feats = model.image_features(pixels)
    ids1 = model.encode_prompt(Q1, True)
    ids2 = model.encode_prompt(Q2, True, history=[(Q1, "a cat")])
    p = ids1.index(IMAGE_TOKEN_INDEX)
    n = model.num_visual_tokens
    v1 = np.array(model.embed_prompt(ids1, feats)[0, p:p + n].tolist())
    v2 = np.array(model.embed_prompt(ids2, feats)[0, p:p + n].tolist())
    cached = np.array(model.embed_prompt(ids2, feats, model.expert_outputs(feats))[0, p:p + n].tolist())
    assert np.abs(v1 - v2).max() > 1e-3
    np.testing.assert_allclose(cached, v2, atol=1e-6)  # cached expert outputs give the same visual tokens


def test_vision_runs_once_per_image(model, images, monkeypatch):
    calls = count_vision_calls(model, monkeypatch)
    s = model.chat(images[0])
    for q in (Q1, Q2):
        s.ask(q, max_tokens=4).consume()
    s.clear()
    s.ask(Q3, max_tokens=4).consume()
    assert len(calls) == 1
    s.set_image(images[1])
    s.ask(Q1, max_tokens=4).consume()
    s.set_image(images[0])
    s.ask(Q1, max_tokens=4).consume()
    assert len(calls) == 2


def test_clear_and_set_image_start_new_conversations(model, images):
    s = model.chat(images[0])
    first = s.ask(Q1, max_tokens=8).consume()
    s.ask(Q2, max_tokens=8).consume()
    s.clear()
    assert s.history == []
    assert s.ask(Q1, max_tokens=8).consume().tokens == first.tokens
    s.set_image(images[1])
    assert s.history == []
    assert s.ask(Q1, max_tokens=8).consume().tokens == model.generate(Q1, images[1], max_tokens=8).tokens


def test_text_only_session_reuses_the_previous_prompt_and_answer(model):
    s = model.chat(None)
    r1 = s.ask(Q1, max_tokens=10).consume()
    r2 = s.ask(Q2, max_tokens=10).consume()
    history = [(Q1, r1.text.strip())]
    assert r2.tokens == model.generate(Q2, None, max_tokens=10, history=history).tokens
    # what the cache held after turn 1: its prompt and the answer tokens fed back
    held = model.encode_prompt(Q1, False) + r1.tokens
    ids2 = model.encode_prompt(Q2, False, history=history)
    common = next(i for i, (a, b) in enumerate(zip(held + [None], ids2)) if a != b)
    assert common >= len(model.encode_prompt(Q1, False))  # all of turn 1's prompt (and the answer, as far
    # as its re-tokenization matches the generated tokens) is reused
    assert r2.prefill_tokens == len(ids2) - common


def test_interrupted_answer_is_not_kept_and_the_cache_stays_usable(model, images):
    s = model.chat(images[0])
    stream = s.ask(Q1, max_tokens=20)
    for _ in range(3):
        next(stream)
    stream.close()
    assert s.history == [] and stream.result.finish_reason is None
    r = s.ask(Q1, max_tokens=8).consume()
    assert r.tokens == model.generate(Q1, images[0], max_tokens=8).tokens


def test_repl_runs_commands_and_turns(model, images, tmp_path):
    script = iter([Q1, "", "/image " + str(tmp_path / "missing.png"), Q2, "/image " + str(images[1]), Q1,
                   "/clear", "/bogus", Q3, "/exit", "never read"])
    out, info = [], []
    s = model.chat(images[0])
    run_repl(s, {"max_tokens": 6}, read=lambda prompt: next(script), write=out.append, info=info.append)
    a1 = model.generate(Q1, images[0], max_tokens=6).text
    a2 = model.generate(Q2, images[0], max_tokens=6, history=[(Q1, a1.strip())]).text
    a3 = model.generate(Q1, images[1], max_tokens=6).text
    a4 = model.generate(Q3, images[1], max_tokens=6).text
    assert "".join(out) == "".join(a + "\n" for a in (a1, a2, a3, a4))
    text = "\n".join(info)
    assert "missing.png: image not found" in text and "Conversation cleared" in text
    assert "Unknown command '/bogus'" in text and next(script) == "never read"


def test_repl_ends_cleanly_at_end_of_input(model):
    out = []

    def read(prompt):
        raise EOFError

    run_repl(model.chat(None), read=read, write=out.append, info=lambda m: None)
    assert out == ["\n"]
