"""The scheduler of `parrot serve` in-process, without HTTP: answers that end at <|im_end|> as one-by-one
generation does, CLIP run once per image across turns (counted), a bounded queue, a clean stop."""

from __future__ import annotations

import threading

import pytest

import parrot
from conftest import random_image, requires_torch
from parrot.inference.generation import SamplingParams
from parrot.serve.protocol import APIError, Limits, parse_chat_request
from parrot.serve.scheduler import Job, Scheduler

pytestmark = requires_torch


def job(model, messages, max_tokens, image=None) -> tuple[Job, threading.Event, list]:
    from parrot.model.prompt import format_conversation

    req = parse_chat_request({"model": "m", "messages": messages}, Limits())
    ids = format_conversation(model.tokenizer, req.turns, generation_preface="").input_ids
    done, events = threading.Event(), []

    def emit(kind, data):
        events.append((kind, data))
        if kind != "delta":
            done.set()

    pixels = None if image is None else model.preprocess(image)
    return Job(ids, pixels, SamplingParams(max_tokens), emit), done, events


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return parrot.load(tiny_ckpt, backend="cpu")


def test_answers_stop_at_im_end_as_one_by_one_and_clip_runs_once_per_image(model):
    calls = []
    real = model.image_features
    model.image_features = lambda pixels: calls.append(1) or real(pixels)
    try:
        image = random_image(40, 30, seed=1)
        session = model.chat(image)
        first = session.ask("What is it?", max_tokens=1000).consume()
        second = session.ask("Tell me more.", max_tokens=1000).consume()
        assert {first.finish_reason, second.finish_reason} == {"stop"}  # the tiny model ends its answers
        calls.clear()
        s = Scheduler(model, max_batch=4)
        s.start()
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                             {"type": "text", "text": "What is it?"}]}]
        j1, d1, e1 = job(model, msgs, 1000, image)
        s.submit(j1)
        assert d1.wait(60)
        msgs += [{"role": "assistant", "content": session.history[0][1]}, {"role": "user", "content": "Tell me more."}]
        j2, d2, e2 = job(model, msgs, 1000, image)
        s.submit(j2)
        assert d2.wait(60)
        s.stop()
    finally:
        del model.image_features
    for j, events, ref in ((j1, e1, first), (j2, e2, second)):
        assert events[-1] == ("done", None)
        assert "".join(d for k, d in events if k == "delta") == j.text == ref.text
        assert (j.finish_reason, j.completion_tokens, j.prompt_tokens) == ("stop", len(ref.tokens), ref.prompt_tokens)
    assert len(calls) == 1  # the follow-up turn reused the first turn's CLIP output
    assert (s.vision_computed, s.vision_cached) == (1, 1)


def test_the_queue_is_bounded_and_stopping_answers_everyone(model):
    s = Scheduler(model, max_batch=1, max_queue=2)  # not started: jobs wait
    waiting = [job(model, [{"role": "user", "content": "hi"}], 5) for _ in range(2)]
    for j, _, _ in waiting:
        s.submit(j)
    with pytest.raises(APIError) as e:
        s.submit(job(model, [{"role": "user", "content": "hi"}], 5)[0])
    assert e.value.status == 503 and e.value.code == "queue_full"
    s.start()
    s.stop()
    for _, done, events in waiting:  # answered or told the server stopped: nobody hangs
        assert done.wait(30)
        assert events[-1][0] == "done" or events[-1][1].status == 503
    with pytest.raises(APIError) as e:
        s.submit(job(model, [{"role": "user", "content": "hi"}], 5)[0])
    assert e.value.status == 503 and e.value.code == "shutting_down"
