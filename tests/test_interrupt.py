"""Ctrl-C during a long command: the message is the last thing on stderr, no progress bar drawn after it.

`parrot train` left its tqdm bar open when interrupted; tqdm drew it again at exit, below "Aborted.".
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BACKENDS, random_image


def interrupt_when(args: list[str], ready: str, cwd: Path, timeout: float = 240) -> tuple[int, str]:
    """Starts `parrot ARGS`, sends SIGINT once `ready` is on its stderr; returns (exit code, stderr).
    SIGINT is reset to its default in the child: a shell may have started the tests ignoring it."""
    log = cwd / "stderr.txt"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "parrot.cli.main", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=f, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout
    try:
        while ready not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"finished before it could be interrupted:\n{log.read_text()}"
        time.sleep(0.3)  # a few steps into the loop
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    return code, log.read_text()


@pytest.mark.parametrize("backend", BACKENDS)
def test_interrupted_training_ends_with_the_message(backend, tiny_ckpt, tmp_path):
    random_image(20, 16).save(tmp_path / "a.png")
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A picture."}]
    (tmp_path / "data.json").write_text(json.dumps([{"id": "a", "image": "a.png", "conversations": conv}]))
    args = ["train", "--backend", backend, "--stage", "2", "--model", str(tiny_ckpt), "--data", "data.json",
            "--output", "run", "--max-steps", "100000", "--num-workers", "0"]
    code, err = interrupt_when(args, "stage 2:", tmp_path)
    assert code == 130
    assert "stage 2:" in err  # the bar was drawn ...
    tail = err.rstrip().rsplit("\n", 1)[-1]
    assert tail == "Aborted.", repr(err[-400:])  # ... and not again after the message
    assert "Traceback" not in err
