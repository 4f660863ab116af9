"""Launching `parrot train` in several processes for the distributed tests (torchrun, the deepspeed
launcher, or one plain process), with a timeout that fails a hang instead of blocking the suite."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from train_helpers import ANSWERS, QUESTIONS

from parrot.training.schedule import StepPlan

SEED, BATCH, WORLD = 42, 2, 2
NUM_SAMPLES, MAX_STEPS, SAVE_EVERY = 9, 6, 2  # 9 samples / global batch 4: every 3rd step is partial


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan() -> StepPlan:
    return StepPlan(NUM_SAMPLES, BATCH, 1, SEED, max_steps=MAX_STEPS, world_size=WORLD)


def write_mixed_data(root: Path) -> tuple[Path, Path]:
    """9 samples; the ones rank 1 trains on in step 1 are text-only, all others have an image."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    text_only = set(plan().micro_batches(0, rank=1)[0])
    samples = []
    for i in range(NUM_SAMPLES):
        q, a = QUESTIONS[i % len(QUESTIONS)], ANSWERS[i % len(ANSWERS)]
        if i in text_only:
            samples.append({"id": f"t{i}", "conversations": [{"from": "human", "value": q},
                                                            {"from": "gpt", "value": a}]})
            continue
        Image.fromarray((rng.random((20 + i, 30, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
        convs = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
        if i % 2:
            convs += [{"from": "human", "value": "1 2 3"}, {"from": "gpt", "value": ANSWERS[(i + 1) % len(ANSWERS)]}]
        samples.append({"id": f"i{i}", "image": f"{i}.png", "conversations": convs})
    path = root / "data.json"
    path.write_text(json.dumps(samples, ensure_ascii=False))
    return path, images


def train_args(model: Path, data: Path, images: Path, output: Path, grad_accum: int, *extra: str) -> list[str]:
    return ["train", "--backend", "cpu", "--stage", "2", "--model", str(model), "--data", str(data), "--image-dir",
            str(images), "--output", str(output), "--num-workers", "0", "--max-steps", str(MAX_STEPS),
            "--save-every", str(SAVE_EVERY), "--lr", "3e-3", "--warmup-ratio", "0.2", "--batch-size", str(BATCH),
            "--grad-accum", str(grad_accum), *extra]


def command(args: list[str], nproc: int, launcher: str = "torchrun") -> list[str]:
    if nproc == 1 and launcher == "none":
        return [sys.executable, "-m", "parrot.cli.main", *args]
    port = str(free_port())
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", str(nproc), "--master_port",
                port, "--module", "parrot.cli.main", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port,
            "-m", "parrot.cli.main", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(args: list[str], nproc: int, launcher: str = "torchrun", timeout: float = 600) -> str:
    """Runs to the end (or fails the test: non-zero exit, or still running after `timeout`, e.g. a hang)."""
    proc = subprocess.Popen(command(args, nproc, launcher), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env(), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s (a hang?):\n{out[-4000:]}") from None
    assert proc.returncode == 0, out[-6000:]
    return out


def launch_and_kill(args: list[str], nproc: int, output: Path, after_step: int, timeout: float = 600) -> None:
    """Starts the run and SIGKILLs every process of it once checkpoint `after_step` is complete.

    The processes are frozen (SIGSTOP) the moment the checkpoint appears and killed; checkpoints a fast
    run wrote meanwhile are removed, so the run is left exactly as if killed right after `after_step`.
    """
    proc = subprocess.Popen(command(args, nproc), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env(), start_new_session=True)
    done = output / "checkpoints" / f"step-{after_step:08d}" / "trainer_state.json"
    deadline = time.time() + timeout
    try:
        while not done.exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGSTOP)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for later in (output / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > after_step:
            shutil.rmtree(later)
