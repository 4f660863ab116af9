"""Answering a JSONL file: every row answered once, resumable after an interruption, bad rows reported."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import parrot
from conftest import random_image, requires_torch
from parrot.errors import ParrotError
from parrot.inference.answers import answer_file, load_answers, read_requests

pytestmark = requires_torch

QUESTIONS = ["What is in the picture?", "这张图片里有什么？", "Describe the image in detail.", "Resimde ne var?",
             "Что изображено на картинке?", "Hi"]


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return parrot.load(tiny_ckpt, backend="cpu")


def write_requests(folder: Path, n: int = 10) -> Path:
    """n requests: images in a subfolder (relative paths), every third row text only."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    random_image(41, 27, seed=3).save(folder / "img" / "a.png")
    random_image(30, 44, seed=4).save(folder / "img" / "b.jpg")
    rows = []
    for i in range(n):
        row = {"id": f"r{i}", "prompt": QUESTIONS[i % len(QUESTIONS)], "max_tokens": 6 + i % 5}
        if i % 3:
            row["image"] = "img/a.png" if i % 2 else "img/b.jpg"
        rows.append(row)
    path = folder / "requests.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def expected(model, folder: Path, row: dict) -> str:
    image = folder / row["image"] if "image" in row else None
    return model.generate(row["prompt"], image, max_tokens=row["max_tokens"]).text


@pytest.mark.parametrize("batch_size", [1, 3])
def test_every_row_is_answered_once_as_generate_would(model, tmp_path, batch_size):
    inp = write_requests(tmp_path / "in")
    out = tmp_path / "answers.jsonl"
    s = answer_file(model, inp, out, batch_size=batch_size, progress=False)
    rows = read_rows(out)
    requests = read_rows(inp)
    assert [r["id"] for r in rows] == [r["id"] for r in requests]
    for req, got in zip(requests, rows):
        assert got["text"] == expected(model, inp.parent, req)
        assert got["finish_reason"] in ("stop", "length") and "error" not in got
        assert got["generation_tokens"] <= req["max_tokens"] + 1
    assert (s.answered, s.errors, s.skipped, s.total) == (10, 0, 0, 10)
    assert s.generation_tokens == sum(r["generation_tokens"] for r in rows)


@pytest.mark.parametrize("interrupt", [Stop, KeyboardInterrupt])
def test_interrupted_run_resumes_without_duplicates_or_losses(model, tmp_path, interrupt):
    inp = write_requests(tmp_path / "in")
    out = tmp_path / "answers.jsonl"
    written = []

    def crash_after_four(row):
        written.append(row["id"])
        if len(written) == 4:
            raise interrupt()

    with pytest.raises(interrupt):
        answer_file(model, inp, out, batch_size=3, progress=False, on_row=crash_after_four)
    first = read_rows(out)
    assert [r["id"] for r in first] == ["r0", "r1", "r2", "r3"]  # every row written before the crash is kept
    s = answer_file(model, inp, out, batch_size=3, progress=False, on_row=lambda r: written.append(r["id"]))
    rows = read_rows(out)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(10)]  # nothing twice, nothing lost
    assert rows[:4] == first
    assert written[4:] == [f"r{i}" for i in range(4, 10)]  # the rerun answered only the rest
    assert (s.skipped, s.answered) == (4, 6)
    reference = tmp_path / "reference.jsonl"
    answer_file(model, inp, reference, batch_size=3, progress=False)
    assert [r["text"] for r in rows] == [r["text"] for r in read_rows(reference)]
    s = answer_file(model, inp, out, progress=False)  # a third run has nothing to do
    assert (s.skipped, s.answered, s.errors) == (10, 0, 0) and read_rows(out) == rows


def test_torn_last_line_and_error_rows_are_repaired_on_rerun(model, tmp_path):
    inp = write_requests(tmp_path / "in", n=5)
    out = tmp_path / "answers.jsonl"
    answer_file(model, inp, out, progress=False)
    good = out.read_bytes().split(b"\n")
    # as if a crash tore the write of r3's row, after r2 had failed once
    out.write_bytes(b"\n".join(good[:2]) + b'\n{"id": "r2", "error": "image not found"}\n' + good[3][:17])
    assert load_answers(out) == {'"r0"', '"r1"'}
    assert out.read_bytes() == b"\n".join(good[:2]) + b"\n"  # repaired in place: complete rows only
    answer_file(model, inp, out, progress=False)
    assert sorted(read_rows(out), key=lambda r: r["id"]) == [json.loads(x) for x in good[:5]]


def test_bad_rows_get_an_error_field_and_the_run_goes_on(model, tmp_path):
    folder = tmp_path / "in"
    inp = write_requests(folder, n=2)
    (folder / "notes.txt").write_text("not an image")
    buf = io.BytesIO()
    random_image(64, 64, seed=1).save(buf, format="PNG")
    (folder / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bad = [
        {"id": "missing", "image": "nowhere.png", "prompt": "What?"},
        {"id": "text", "image": "notes.txt", "prompt": "What?"},
        {"id": "cut", "image": "cut.png", "prompt": "What?"},
        {"id": "noprompt", "image": "img/a.png"},
        {"id": "numprompt", "prompt": 3},
        {"id": "zero", "prompt": "Hi", "max_tokens": 0},
        {"id": "both", "prompt": "Hi", "temp": 0.5, "temperature": 0.5},
        {"id": "topp", "prompt": "Hi", "top_p": 2},
        {"prompt": "no id"},
        {"id": True, "prompt": "bool id"},
    ]
    lines = inp.read_text().splitlines()
    lines[1:1] = [json.dumps(b) for b in bad] + ["{not json", "[1, 2]"]
    inp.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers.jsonl"
    s = answer_file(model, inp, out, batch_size=4, progress=False)
    rows = read_rows(out)
    assert len(rows) == 14 and (s.answered, s.errors) == (2, 12)
    by_id = {r["id"]: r for r in rows if r["id"] is not None}
    assert by_id["r0"]["text"] == expected(model, folder, json.loads(lines[0]))
    assert by_id["r1"]["text"] == expected(model, folder, json.loads(lines[-1]))
    messages = {
        "missing": "image not found", "text": "not an image", "cut": "truncated", "noprompt": "missing prompt",
        "numprompt": "prompt must be a string", "zero": "max_tokens", "both": "temperature or temp",
        "topp": "top_p",
    }
    for rid, needle in messages.items():
        assert needle in by_id[rid]["error"], (rid, by_id[rid])
    lineless = [r for r in rows if r["id"] is None]
    assert [(r["line"], r["error"].split(":")[0]) for r in lineless] == [
        (10, "line 10 has no id; each request needs a unique string or integer id"),
        (11, "line 11 has an unusable id True; each request needs a unique string or integer id"),
        (12, "line 12"), (13, "line 13")]
    # fix the missing image and rerun: only the failed rows are tried again, each id still once
    random_image(20, 20, seed=9).save(folder / "nowhere.png")
    s = answer_file(model, inp, out, batch_size=4, progress=False)
    rows = read_rows(out)
    assert (s.skipped, s.answered, s.errors) == (2, 1, 11)
    assert len(rows) == 14 and sum(r["id"] == "missing" for r in rows) == 1
    assert "text" in next(r for r in rows if r["id"] == "missing")


def test_per_row_settings_override_the_defaults(model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    random_image(41, 27, seed=3).save(folder / "a.png")
    rows = [{"id": 1, "prompt": "Hi", "max_tokens": 3},
            {"id": 2, "prompt": "Hi", "temp": 0.9, "top_p": 0.8, "seed": 5, "image": "a.png"},
            {"id": 3, "prompt": "Hi", "system": "You are a poet."},
            {"id": "4", "prompt": "Hi", "comment": "ignored"}]
    inp = folder / "requests.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "answers.jsonl"
    s = answer_file(model, inp, out, batch_size=4, progress=False, defaults={"max_tokens": 7, "system": "Be brief."})
    got = {r["id"]: r for r in read_rows(out)}
    assert got[1]["text"] == model.generate("Hi", max_tokens=3, system="Be brief.").text
    assert got[2]["text"] == model.generate("Hi", folder / "a.png", 7, 0.9, 0.8, seed=5, system="Be brief.").text
    assert got[2]["seed"] == 5 and "seed" not in got[1]
    assert got[3]["text"] == model.generate("Hi", max_tokens=7, system="You are a poet.").text
    assert got["4"]["text"] == model.generate("Hi", max_tokens=7, system="Be brief.").text
    assert s.ignored_fields == ["comment"]


def test_image_paths_are_relative_to_the_input_folder_or_image_dir(model, tmp_path):
    inp = write_requests(tmp_path / "in", n=3)
    out = tmp_path / "answers.jsonl"
    answer_file(model, inp, out, progress=False)
    assert all("text" in r for r in read_rows(out))
    other = tmp_path / "elsewhere"
    (other / "img").mkdir(parents=True)
    random_image(41, 27, seed=3).save(other / "img" / "a.png")
    out2 = tmp_path / "answers2.jsonl"
    answer_file(model, inp, out2, image_dir=other, progress=False)
    rows = read_rows(out2)
    assert "text" in rows[1] and "img/b.jpg: image not found" in rows[2]["error"]  # b.jpg only in the input's folder
    assert rows[1]["text"] == read_rows(out)[1]["text"]


def test_duplicate_ids_and_other_whole_file_problems_raise(model, tmp_path):
    inp = tmp_path / "requests.jsonl"
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n{"id": "a", "prompt": "z"}\n')
    with pytest.raises(ParrotError, match=r"id 'a' is used on lines 1 and 3"):
        answer_file(model, inp, tmp_path / "out.jsonl", progress=False)
    inp.write_text('{"id": 1, "prompt": "x"}\n{"id": "1", "prompt": "y"}\n')  # 1 and "1" are different ids
    assert [r.key for r in read_requests(inp)[0]] == ["1", '"1"']
    with pytest.raises(ParrotError, match="input file not found"):
        answer_file(model, tmp_path / "nope.jsonl", tmp_path / "out.jsonl", progress=False)
    with pytest.raises(ParrotError, match="is the input"):
        answer_file(model, inp, inp, progress=False)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("hello\n")
    with pytest.raises(ParrotError, match="line 1 is not an answer row"):
        answer_file(model, inp, foreign, progress=False)
    assert foreign.read_text() == "hello\n"  # left alone
    with pytest.raises(ParrotError, match="batch size"):
        answer_file(model, inp, tmp_path / "out.jsonl", batch_size=0, progress=False)
    with pytest.raises(ParrotError, match="image directory not found"):
        answer_file(model, inp, tmp_path / "out.jsonl", image_dir=tmp_path / "none", progress=False)


def test_a_request_failing_inside_a_batch_fails_alone(model, tmp_path, monkeypatch):
    """A ParrotError raised while a batch runs: its requests are retried one by one, only the bad one fails."""
    import parrot.inference.batch as answers  # generate_each retries a failed batch one request at a time

    real = answers.generate_batch

    def picky(m, requests, images=None, stop=None):
        if any(r.prompt == "Hi" for r in requests):
            raise ParrotError("this prompt is not allowed")
        return real(m, requests, images, stop)

    monkeypatch.setattr(answers, "generate_batch", picky)
    inp = write_requests(tmp_path / "in", n=6)  # row r5 asks "Hi"
    out = tmp_path / "answers.jsonl"
    s = answer_file(model, inp, out, batch_size=3, progress=False)
    rows = read_rows(out)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(6)] and (s.answered, s.errors) == (5, 1)
    assert rows[5] == {"id": "r5", "error": "this prompt is not allowed"}
    requests = read_rows(inp)
    assert [r["text"] for r in rows[:5]] == [expected(model, inp.parent, q) for q in requests[:5]]


def test_an_image_too_large_once_padded_gets_an_error_row(model, tmp_path):
    """A 30000x1 PNG (a few hundred bytes) would pad to 900 M pixels: refused before any allocation."""
    from PIL import Image

    Image.new("RGB", (30000, 1), (200, 10, 10)).save(tmp_path / "thin.png")
    random_image(30, 20, seed=1).save(tmp_path / "ok.png")
    rows = [{"id": "thin", "prompt": "What?", "image": "thin.png", "max_tokens": 2},
            {"id": "ok", "prompt": "What?", "image": "ok.png", "max_tokens": 2}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    answer_file(model, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False)
    out = {r["id"]: r for r in read_rows(tmp_path / "out.jsonl")}
    assert "pads to a square of 30000x30000" in out["thin"]["error"] and "text" in out["ok"]
