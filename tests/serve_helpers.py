"""`parrot serve` in a real process for the tests: a tiny checkpoint whose greedy answers never stop
early (so a long answer can be cut off by a client), started on a free loopback port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from parrot.storage.safetensors_io import CheckpointFiles, save_tensors
from parrot.testing import TinySpec, write_tiny_checkpoint

API_KEY = "test-key-123"


def never_stopping_checkpoint(out: Path) -> Path:
    """The tiny checkpoint with <|im_end|>'s lm_head row zeroed: its logit is 0, below the best of ~400
    random logits, so greedy answers run to max_tokens."""
    d = write_tiny_checkpoint(out, TinySpec(), seed=0)
    from parrot.model.tokenizer import Tokenizer

    eos = Tokenizer.from_dir(d).eos_id
    files = CheckpointFiles(d)
    w = {k: np.array(files.read(k)) for k in files.keys()}
    w["lm_head.weight"][eos] = 0
    for f in d.glob("model*.safetensors*"):
        f.unlink()
    save_tensors(w, d)
    return d


class Server:
    """`parrot serve --port 0 ...` in a subprocess; `url` once it listens; `log` its stderr lines."""

    def __init__(self, ckpt: Path, backend: str, *args: str, timeout: float = 180):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "parrot.cli.main", "serve", "--model", str(ckpt), "--backend", backend,
             "--port", "0", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.log: list[str] = []
        self.url: str | None = None
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.log.append(line.rstrip("\n"))
                m = re.search(r"Serving .* at (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or self.url is None:
            self.proc.kill()
            raise RuntimeError("parrot serve did not start:\n" + "\n".join(self.log))
        self.wait_until_up()

    def wait_until_up(self, timeout: float = 30) -> None:
        import httpx

        t_end = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > t_end:
                raise RuntimeError("parrot serve does not answer /health:\n" + "\n".join(self.log))
            time.sleep(0.1)

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=5).json()

    def interrupt(self, timeout: float = 20) -> int:
        """Ctrl-C; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9
