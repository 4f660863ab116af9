"""Load test of `parrot serve` (bounded, loopback only): continuous batching against one request at a time.

Writes a small random Parrot checkpoint (default: hidden 256, 4 layers; TinySpec's tokenizer and CLIP),
starts `parrot serve` twice on free 127.0.0.1 ports, `--max-batch 8` and `--max-batch 1`, and sends each
the same 32 chat completions (half with an image, greedy, max_tokens 64) from 8 concurrent clients
(the official `openai` client), alternating which server goes first over --rounds. Prints, per setting,
the aggregate completion tokens per second (all answers' tokens over the wall time of the 32 requests),
the median request latency, and the ratio batch-8 / batch-1. Answers are checked equal between the two
settings (greedy continuous batching answers as one by one).

    python scripts/bench_serve.py [--backend cpu --requests 32 --clients 8 --max-tokens 64 --rounds 2]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from bench_common import QUESTIONS, cpu_name
from parrot.testing import TinySpec, write_tiny_checkpoint


def start(ckpt: Path, backend: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "parrot.cli.main", "serve", "--model", str(ckpt), "--backend",
                             backend, "--host", "127.0.0.1", "--port", "0", "--max-batch", str(max_batch)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    found: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stderr:
            m = re.search(r"Serving .* at (http://\S+)", line)
            if m:
                found.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(300) or not found:
        proc.kill()
        raise SystemExit("parrot serve did not start")
    return proc, found[0]


def requests(n: int) -> list[list[dict]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        q = f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"
        if i % 2:
            buf = io.BytesIO()
            Image.fromarray((rng.random((40 + i, 48, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            out.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": q}]}])
        else:
            out.append([{"role": "user", "content": q}])
    return out


def load(url: str, msgs: list, clients: int, max_tokens: int) -> tuple[float, list[float], list[str], int]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)

    def one(m):
        t0 = time.perf_counter()
        r = client.chat.completions.create(model="bench", messages=m, max_tokens=max_tokens, temperature=0)
        return time.perf_counter() - t0, r.choices[0].message.content, r.usage.completion_tokens

    client.chat.completions.create(model="bench", messages=msgs[0], max_tokens=4)  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, msgs))
    wall = time.perf_counter() - t0
    return wall, [r[0] for r in results], [r[1] for r in results], sum(r[2] for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    spec = replace(TinySpec(), hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                   moe_intermediate_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=8,
                   num_key_value_heads=4)
    msgs = requests(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoint(Path(tmp) / "bench", spec, seed=0)
        servers = {mb: start(ckpt, args.backend, mb) for mb in (8, 1)}
        runs: dict[int, list] = {8: [], 1: []}
        try:
            for r in range(args.rounds):
                for mb in ((8, 1) if r % 2 == 0 else (1, 8)):
                    runs[mb].append(load(servers[mb][1], msgs, args.clients, args.max_tokens))
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGINT)
                proc.wait(30)
    print(f"machine: {platform.system()} {platform.machine()}, {cpu_name()}, {os.cpu_count()} CPUs; "
          f"backend {args.backend}; model hidden {args.hidden}, {args.layers} layers; {args.requests} requests "
          f"(half with an image) from {args.clients} clients, max_tokens {args.max_tokens}, greedy, "
          f"{args.rounds} rounds")
    tps = {}
    for mb in (8, 1):
        best = max(runs[mb], key=lambda x: x[3] / x[0])
        tps[mb] = best[3] / best[0]
        print(f"--max-batch {mb}: {tps[mb]:8.1f} completion tokens/s aggregate ({best[3]} tokens in {best[0]:.2f} s), "
              f"median latency {statistics.median(best[1]):.2f} s; per round: "
              + ", ".join(f"{x[3] / x[0]:.1f}" for x in runs[mb]))
    same = all(a[2] == b[2] for a in runs[8] for b in runs[1])
    print(f"ratio batch 8 / batch 1: {tps[8] / tps[1]:.2f}x; answers identical across settings: {same}")
    if not same:
        raise SystemExit("answers differ between --max-batch 8 and --max-batch 1")


if __name__ == "__main__":
    main()
