"""Fuzzing the data files: LLaVA JSON training data (read and checked up front, then a kept sample
formatted with its image; one of the images is itself a damaged PNG) and `parrot generate`'s JSONL
requests and answers. Whatever the bytes, the loader returns or raises ParrotError (see tests/fuzz.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fuzz import FUZZ, cases, dumps, jsonl_lines, mutate_bytes, mutate_json, only_parrot_errors, write
from hypothesis import given
from train_helpers import mixed_samples, write_images

from parrot.inference.answers import load_answers, read_requests
from parrot.model.image import ImageSettings
from parrot.model.tokenizer import Tokenizer
from parrot.training.data import LlavaData

SIZE = 30  # the tiny tower's image size


@pytest.fixture(scope="module")
def llava(tmp_path_factory, tiny_ckpt) -> tuple[Path, list[dict], Tokenizer]:
    """An image folder with good and bad images, valid samples using them, the tiny tokenizer."""
    root = tmp_path_factory.mktemp("fuzz-llava")
    images = write_images(root, 3)
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "cut.png").write_bytes((root / images[0]).read_bytes()[:60])
    (root / "dir.png").mkdir()
    samples = mixed_samples([*images, "bad.png", "cut.png", "dir.png", "missing.png", "fuzzed.png"], 14)
    return root, samples, Tokenizer.from_dir(tiny_ckpt)


def load_llava(path: Path, image_dir: Path, tok: Tokenizer) -> int:
    data = LlavaData(path, image_dir, tok, ImageSettings.clip_defaults(SIZE), SIZE + 1, max_length=160)
    item = data.item(0)  # formatted, with its image decoded (or the mean image for an undecodable one)
    assert item["pixel_values"].shape == (3, SIZE, SIZE) and len(item["input_ids"]) == len(item["labels"])
    assert 0 < data.report.kept + data.report.num_dropped == data.report.total
    return len(data)


@FUZZ(2000)
@given(r=cases())
def test_llava_json_raises_only_parrot_errors(llava, r):
    root, samples, tok = llava
    write(root / "fuzzed.png", mutate_bytes(r, (root / "img1.png").read_bytes(), protect=r.choice([0, 8, 16])))
    valid = r.sample(samples, r.randint(1, 3))
    raw = mutate_bytes(r, dumps(valid)) if r.random() < 0.2 else dumps(mutate_json(r, valid, ["id", "image"]))
    path = write(root / "data.json", raw)
    only_parrot_errors("LLaVA JSON (LlavaData)", load_llava, path, root, tok)


REQUESTS = [
    {"id": "q1", "image": "photos/cat.jpg", "prompt": "What is in the picture?"},
    {"id": 2, "prompt": "Translate 'cat'.", "max_tokens": 32, "temperature": 0.7, "top_p": 0.9, "seed": 1},
    {"id": "q3", "prompt": "Hi", "system": "Be brief.", "temp": 0.0, "image": None},
]
ANSWERS = [
    {"id": "q1", "text": "A cat.", "finish_reason": "stop", "prompt_tokens": 600, "generation_tokens": 4},
    {"id": 2, "error": "image not found: x.jpg"},
    {"id": None, "line": 7, "error": "line 7: not valid JSON"},
]


@FUZZ(2000)
@given(r=cases())
def test_jsonl_requests_raise_only_parrot_errors(tmp_path_factory, r):
    path = write(tmp_path_factory.getbasetemp() / "fuzz_requests.jsonl", jsonl_lines(r, REQUESTS))
    out = only_parrot_errors("JSONL requests (read_requests)", read_requests, path)
    if out is not None:
        for row in out[0]:  # a row without an error is answerable: an id and a string prompt
            assert row.error is not None or (row.key is not None and isinstance(row.fields["prompt"], str))


@FUZZ(2000)
@given(r=cases())
def test_jsonl_answers_raise_only_parrot_errors(tmp_path_factory, r):
    path = write(tmp_path_factory.getbasetemp() / "fuzz_answers.jsonl", jsonl_lines(r, ANSWERS))
    answered = only_parrot_errors("JSONL answers (load_answers)", load_answers, path)
    if answered is not None:  # the repaired file keeps exactly the answer rows, each complete
        rows = [json.loads(line) for line in path.read_bytes().split(b"\n") if line.strip()]
        assert all("error" not in row for row in rows)
        assert {json.dumps(row["id"], ensure_ascii=False) for row in rows} == answered


def test_found_crashes_are_dropped_with_a_reason(llava, tmp_path):
    """What the fuzzer found: a turn whose `from` is a list (unhashable), text with a lone surrogate
    (the tokenizer's TypeError), an image name longer than the file system allows (OSError)."""
    root, samples, tok = llava
    good = {"id": "ok", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    bad = [
        {"id": "role", "conversations": [{"from": ["gpt"], "value": "Hi"}, {"from": "gpt", "value": "x"}]},
        {"id": "surrogate", "conversations": [{"from": "human", "value": "Hi \ud800"}, {"from": "gpt", "value": "x"}]},
        {"id": "long", "image": "a" * 5000, "conversations": [{"from": "human", "value": "<image>"},
                                                              {"from": "gpt", "value": "x"}]},
    ]
    pictured = {"id": "pic", "image": "img0.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                                    {"from": "gpt", "value": "Hello"}]}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([good, pictured, *bad]))  # one usable image: a data set whose images all fail is refused
    data = LlavaData(path, root, tok, ImageSettings.clip_defaults(SIZE), SIZE + 1, max_length=160)
    assert [s.id for s in data.samples] == ["ok", "pic"]
    dropped = {it["id"]: reason for reason, items in data.report.dropped.items() for it in items}
    assert dropped == {"role": "empty or malformed conversations", "surrogate": "empty or malformed conversations",
                       "long": "image not found"}
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": 1, "prompt": "Hi \ud800"}) + "\n")
    (row,), _ = read_requests(requests)
    assert row.error == "prompt and system must be valid Unicode text (no lone surrogates)"
