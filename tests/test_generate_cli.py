"""`parrot generate` and `parrot bench` end to end (subprocess: real exit codes, a real SIGKILL)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import parrot
from conftest import (
    BACKENDS,
    HAS_MLX,
    assert_clean_failure,
    random_image,
    requires_mlx,
    requires_torch,
    run_parrot,
    run_parrot_here,
)

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny torch models on a shared 2-core machine
NUMBER = r"(\d+\.\d{3})"


def write_requests(folder, n):
    (folder / "img").mkdir(parents=True, exist_ok=True)
    random_image(41, 27, seed=3).save(folder / "img" / "a.png")
    rows = [{"id": f"r{i}", "prompt": f"Question {i}: what is in the picture?", "max_tokens": 8}
            | ({"image": "img/a.png"} if i % 2 else {}) for i in range(n)]
    path = folder / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def output_ids(path):
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


@pytest.mark.slow  # end to end through the CLI on both backends: make test runs it, make test-quick skips it
@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_command_answers_then_resumes_with_nothing_to_do(backend, tiny_ckpt, tmp_path):
    inp, rows = write_requests(tmp_path / "in", 5)
    out = tmp_path / "out" / "answers.jsonl"
    proc = run_parrot("generate", "--backend", backend, "--model", tiny_ckpt, "-i", inp, "-o", out, "-b", "2",
                      env=ONE_THREAD, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "5 requests, 0 already answered, 5 to do" in proc.stderr
    assert re.search(r"generate: 100%.*5/5", proc.stderr)  # the progress bar, with rate and ETA fields
    assert "Answered 5, errors 0, skipped 0" in proc.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    model = parrot.load(tiny_ckpt, backend=backend)
    for row, answer in zip(rows, got):
        image = inp.parent / row["image"] if "image" in row else None
        assert answer["text"] == model.generate(row["prompt"], image, max_tokens=8).text
    before = out.read_bytes()
    proc = run_parrot("generate", "--backend", backend, "--model", tiny_ckpt, "-i", inp, "-o", out, env=ONE_THREAD)
    assert proc.returncode == 0 and "All 5 requests" in proc.stderr and "Loading" not in proc.stderr
    assert out.read_bytes() == before


@requires_mlx
def test_killed_generate_loses_nothing_and_resumes(tiny_ckpt, tmp_path):
    """SIGKILL in the middle of a run: the output holds only complete rows (or a torn last one,
    repaired on rerun); the rerun answers the rest; every id appears once."""
    inp, rows = write_requests(tmp_path, 120)
    out = tmp_path / "answers.jsonl"
    args = [sys.executable, "-m", "parrot.cli.main", "generate", "--backend", "mlx", "--model", str(tiny_ckpt),
            "-i", str(inp), "-o", str(out), "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = out.read_bytes()
    assert 5 <= first.count(b"\n") < 120, "the run was not interrupted in the middle"
    complete = first[: first.rfind(b"\n") + 1].decode().splitlines()
    assert [json.loads(line)["id"] for line in complete] == [f"r{i}" for i in range(len(complete))]
    out.write_bytes(first + b'{"id": "r119", "te')  # and a torn line, as a crash inside a write leaves
    again = run_parrot("generate", "--backend", "mlx", "--model", tiny_ckpt, "-i", inp, "-o", out, "--quiet")
    assert again.returncode == 0, again.stderr
    assert f"skipped {len(complete)} (already answered)" in again.stderr
    assert sorted(output_ids(out), key=lambda s: int(s[1:])) == [r["id"] for r in rows]
    assert out.read_text().splitlines()[: len(complete)] == complete


@requires_torch
def test_generate_command_errors_are_clean(tiny_ckpt, tmp_path):
    inp, _ = write_requests(tmp_path, 2)
    out = tmp_path / "answers.jsonl"
    base = ("generate", "--backend", "cpu", "--model", tiny_ckpt)
    assert_clean_failure(run_parrot_here(*base, "-i", tmp_path / "nope.jsonl", "-o", out), "nope.jsonl", "not found")
    assert_clean_failure(run_parrot_here(*base, "-i", inp, "-o", out, "--batch-size", "0"), "--batch-size must be >= 1")
    assert_clean_failure(run_parrot_here(*base, "-i", inp, "-o", out, "--temp", "-1"), "--temp must be")
    assert_clean_failure(run_parrot_here(*base, "-i", inp, "-o", out, "--top-p", "2"), "--top-p must be")
    assert_clean_failure(run_parrot_here(*base, "-i", inp, "-o", out, "--image-dir", tmp_path / "none"),
                         "image directory not found")
    assert_clean_failure(run_parrot_here(*base, "-o", out), "Missing option", "--input")
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    assert_clean_failure(run_parrot_here(*base, "-i", dup, "-o", out), "id 'a' is used on lines 1 and 2")
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my notes\n")
    assert_clean_failure(run_parrot_here(*base, "-i", inp, "-o", foreign), "not an answer row")
    assert_clean_failure(run_parrot_here("generate", "--backend", "cpu", "--model", tmp_path / "nomodel", "-i", inp,
                                    "-o", out), "nomodel")
    assert not out.exists()


# ------------------------------------------------------------------------------------------ bench
TRIAL = re.compile(rf"^Trial (\d+):  prompt_tps={NUMBER}, generation_tps={NUMBER}, "
                   rf"time_to_first_token={NUMBER}, peak_memory={NUMBER}, total_time={NUMBER}$")
AVERAGES = re.compile(rf"^Averages: prompt_tps={NUMBER}, generation_tps={NUMBER}, "
                      rf"time_to_first_token={NUMBER}, peak_memory={NUMBER}$")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_prints_mlx_lm_style_report(backend, tiny_ckpt):
    proc = run_parrot("bench", "--backend", backend, "--model", tiny_ckpt, "-p", "20", "-g", "6", "-n", "2",
                      env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "Running warmup.."
    v = parrot.load(tiny_ckpt, backend="cpu" if backend == "cpu" else "mlx").vision_config
    visual = (v.image_size // v.patch_size) ** 2 + 1  # the tiny config keeps the CLS token ("cls_patch")
    assert lines[1].startswith(f"Timing with prompt_tokens=20 (+{visual} visual), generation_tokens=6, batch_size=1, "
                               "image=synthetic")
    trials = [TRIAL.match(line) for line in lines[2:4]]
    assert all(trials) and [int(t.group(1)) for t in trials] == [1, 2]
    values = [[float(x) for x in t.groups()[1:]] for t in trials]
    assert all(x > 0 for row in values for x in row)
    avg = AVERAGES.match(lines[4])
    assert avg and len(lines) == 5
    for k in range(4):
        assert float(avg.group(k + 1)) == pytest.approx((values[0][k] + values[1][k]) / 2, abs=0.0011)


@requires_torch
def test_bench_command_errors_are_clean(tiny_ckpt, tmp_path):
    base = ("bench", "--backend", "cpu", "--model", tiny_ckpt)
    assert_clean_failure(run_parrot_here(*base, "-p", "0"), "--prompt-tokens must be >= 1")
    assert_clean_failure(run_parrot_here(*base, "--image", tmp_path / "none.png"), "image not found")
    (tmp_path / "notes.txt").write_text("not an image")
    assert_clean_failure(run_parrot_here(*base, "--image", tmp_path / "notes.txt"), "not an image")
    assert_clean_failure(run_parrot_here(*base, "--image", tmp_path / "notes.txt", "--no-image"), "exclude each other")
    assert_clean_failure(run_parrot_here("bench", "--backend", "cpu"), "Missing option", "--model")


@pytest.mark.parametrize("backend", BACKENDS)
def test_benchmark_generates_exactly_the_asked_tokens_and_redoes_vision(backend, tiny_ckpt):
    from parrot.inference.bench import run_benchmark

    model = parrot.load(tiny_ckpt, backend=backend)
    trials = run_benchmark(model, prompt_tokens=12, gen_tokens=40, num_trials=2, warmup=False)
    for t in trials:
        r = t.result
        assert r.generation_tokens == 40 and r.finish_reason == "length"  # the stop token is ignored
        assert r.prompt_tokens == r.prefill_tokens == 12 + model.num_visual_tokens
        assert r.vision_time > 0 and r.time_to_first_token >= r.vision_time  # vision redone in every trial
        assert t.total_time >= r.time_to_first_token
    text_only = run_benchmark(model, prompt_tokens=12, gen_tokens=5, image=False, num_trials=1, warmup=False)
    assert text_only[0].result.prompt_tokens == 12 and text_only[0].result.vision_time == 0
    batch = run_benchmark(model, prompt_tokens=12, gen_tokens=6, num_trials=1, batch_size=3, warmup=False)
    assert batch[0].result.generation_tokens == 6 and batch[0].result.generation_tps > 0


@requires_mlx
def test_ctrl_c_keeps_the_answers_and_says_how_to_resume(tiny_ckpt, tmp_path):
    # far more work than can finish between the third answer and the signal (120 requests once took 2.6 s in all,
    # so the job was done before SIGINT arrived); interrupted early, the job costs no more than before
    n = 3000
    inp, _ = write_requests(tmp_path, n)
    out = tmp_path / "answers.jsonl"
    args = [sys.executable, "-m", "parrot.cli.main", "generate", "--backend", "mlx", "--model", str(tiny_ckpt),
            "-i", str(inp), "-o", str(out), "--quiet"]
    # SIGINT back to its default in the child: under a job started in the background by a non-interactive shell
    # (`make test &`, some CI runners) SIGINT is ignored, and Python then raises no KeyboardInterrupt at all
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "run the same command again to continue" in err
    lines = out.read_text().splitlines()
    assert 3 <= len(lines) < n and out.read_text().endswith("\n")
    assert [json.loads(line)["id"] for line in lines] == [f"r{i}" for i in range(len(lines))]


def test_generate_refuses_an_empty_input_and_an_unwritable_output(tiny_ckpt, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert_clean_failure(run_parrot("generate", "--model", tiny_ckpt, "-i", empty, "-o", tmp_path / "a.jsonl"),
                         "no requests")
    inp, _ = write_requests(tmp_path, 1)
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_parrot("generate", "--backend", "mlx" if HAS_MLX else "cpu", "--model", tiny_ckpt, "-i", inp,
                      "-o", blocker / "answers.jsonl", env=ONE_THREAD)
    assert_clean_failure(proc, "cannot write the answers")
