"""Answering with a tiny model: batched = one by one, cpu = mlx, a SIGKILLed run resumes without asking
anything twice, a torn record is dropped, a bad row is recorded and retried."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from eval_helpers import circular_rows, mcq_rows, write_tsv

from conftest import BACKENDS, requires_mlx, requires_torch
from parrot.eval import EvalSettings, evaluate
from parrot.eval.predictions import AnswerFile
from parrot.eval.sources import DataSource

pytestmark = requires_torch


def _sources(tmp_path, n=5):
    a = write_tsv(tmp_path / "data" / "toy_pt.tsv", mcq_rows(n))
    b = write_tsv(tmp_path / "data" / "MMBench_toy_en.tsv", circular_rows(2))
    return [DataSource("toy_pt", a), DataSource("MMBench_toy_en", b)]


def _run(model, sources, out, batch_size=1, **kw):
    return evaluate(sources, out, model=model, settings=EvalSettings(batch_size=batch_size, max_tokens=6,
                                                                     progress=False, **kw), echo=lambda m: None)


@pytest.fixture(scope="module")
def cpu_model(tiny_ckpt):
    import parrot

    return parrot.load(tiny_ckpt, backend="cpu")


def test_batched_answers_equal_one_by_one(tmp_path, cpu_model):
    srcs = _sources(tmp_path)
    one = _run(cpu_model, srcs, tmp_path / "one", batch_size=1)
    batched = _run(cpu_model, srcs, tmp_path / "batched", batch_size=4)
    for s in srcs:
        a, b = (tmp_path / d / f"{s.name}.tsv" for d in ("one", "batched"))
        assert a.read_bytes() == b.read_bytes()
        assert one["datasets"][s.name]["overall"] == batched["datasets"][s.name]["overall"]
    answers = AnswerFile(tmp_path / "one" / "toy_pt.tsv", []).path.read_text()
    assert answers.count("\n") > 5  # a header and five answers (which may span lines)


@requires_mlx
def test_cpu_and_mlx_give_identical_predictions(tmp_path, tiny_ckpt, cpu_model):
    import parrot

    srcs = [_sources(tmp_path, n=3)[0]]
    _run(cpu_model, srcs, tmp_path / "cpu", batch_size=2)
    _run(parrot.load(tiny_ckpt, backend="mlx"), srcs, tmp_path / "mlx", batch_size=2)
    assert (tmp_path / "cpu" / "toy_pt.tsv").read_bytes() == (tmp_path / "mlx" / "toy_pt.tsv").read_bytes()


def test_limit_answers_the_first_questions_with_their_rotations(tmp_path, cpu_model):
    s = _run(cpu_model, _sources(tmp_path), tmp_path / "out", batch_size=3, limit=1)
    assert s["datasets"]["toy_pt"]["rows"] == 1
    assert s["datasets"]["MMBench_toy_en"]["rows"] == 4 and s["datasets"]["MMBench_toy_en"]["questions"] == 1


def test_bad_row_is_recorded_and_retried_alone(tmp_path, cpu_model):
    rows = mcq_rows(4)
    rows[2]["image"] = base64.b64encode(b"x" * 80).decode()
    src = DataSource("toy_en", write_tsv(tmp_path / "toy_en.tsv", rows))
    s = _run(cpu_model, [src], tmp_path / "out", batch_size=2)
    entry = s["datasets"]["toy_en"]
    assert entry["unanswered"] == ["2"] and "does not decode" in entry["errors"]["2"]
    assert entry["rows"] == 4 and entry["answered_now"] == 3  # scored: the unanswered row counts as wrong
    again = _run(cpu_model, [src], tmp_path / "out", batch_size=2)["datasets"]["toy_en"]
    assert again["answered_before"] == 3 and again["answered_now"] == 0 and list(again["errors"]) == ["2"]


def test_torn_last_record_is_dropped_and_repaired(tmp_path, cpu_model):
    src = _sources(tmp_path)[0]
    out = tmp_path / "out"
    _run(cpu_model, [src], out)
    path = out / "toy_pt.tsv"
    whole = path.read_bytes()
    last = whole.rindex(b'"\n"') + 2  # records end with a quote and a newline: where the last one starts
    path.write_bytes(whole[:last + 9])  # the last record cut inside a field
    s = _run(cpu_model, [src], out)["datasets"]["toy_pt"]
    assert s["answered_now"] == 1 and path.read_bytes() == whole


@pytest.mark.slow  # a real SIGKILL / browser end to end: make test runs it, make test-quick skips it
def test_sigkilled_run_resumes_without_answering_twice(tmp_path, tiny_ckpt, cpu_model):
    data = write_tsv(tmp_path / "toy_en.tsv", mcq_rows(12))
    out = tmp_path / "out"

    def command(output):
        return [sys.executable, "-m", "parrot.cli.main", "eval", str(data), "--model", str(tiny_ckpt), "--backend",
                "cpu", "-o", str(output), "--max-tokens", "16", "--quiet"]

    args = command(out)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    answers = out / "toy_en.tsv"
    deadline = time.time() + 240
    try:
        while not (answers.exists() and answers.read_bytes().count(b'"\n"') >= 5):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no answers in time"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGSTOP)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    header = answers.read_text().split("\n")[0].replace('"', "").split("\t")
    done = len(AnswerFile(answers, header).read(repair=False))
    assert 2 <= done < 12
    p = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    entry = json.loads((out / "summary.json").read_text())["datasets"]["toy_en"]
    assert entry["answered_before"] == done and entry["answered_now"] == 12 - done
    uninterrupted = tmp_path / "again"
    evaluate([DataSource("toy_en", data)], uninterrupted, model=cpu_model,
             settings=EvalSettings(max_tokens=16, progress=False), echo=lambda m: None)
    assert answers.read_bytes() == (uninterrupted / "toy_en.tsv").read_bytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_bad_input_fails_before_loading(tmp_path, backend):
    from conftest import assert_clean_failure, run_parrot

    rows = [{k: v for k, v in r.items() if k != "question"} for r in mcq_rows(2)]
    data = write_tsv(tmp_path / "toy.tsv", rows)
    p = run_parrot("eval", data, "--model", tmp_path / "no-model", "--backend", backend, "-o", tmp_path / "o")
    assert_clean_failure(p, "missing column question")
    p = run_parrot("eval", data, "--model", "m", "--backend", backend, "-o", tmp_path / "o", "--batch-size", "0")
    assert_clean_failure(p, "--batch-size must be >= 1")
    good = write_tsv(tmp_path / "good.tsv", mcq_rows(2))
    (tmp_path / "model").mkdir()
    p = run_parrot("eval", good, "--model", tmp_path / "model", "--backend", backend, "-o", tmp_path / "model" / "ev")
    assert_clean_failure(p, "lies inside the --model")
    assert not (tmp_path / "o").exists() and not (tmp_path / "model" / "ev").exists()
