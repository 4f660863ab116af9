"""`parrot eval` throughput: questions/s answered one by one (--batch-size 1) and batched, same model.

Writes the tiny random test checkpoint (`parrot.testing.write_tiny_checkpoint`, or --model DIR) and
a synthetic VLMEvalKit MCQ TSV (random images as base64, four options, a hint on some rows), then
answers it with `parrot.eval.run.answer_dataset` (the `parrot eval` path: the wrapper's prompt,
base64 -> JPEG, preprocessing, generation, clean-up, the resumable answers file) once per batch
size, in alternating order, and prints questions/s and whether the answers files are identical.

    python scripts/bench_eval.py [--backend cpu|mlx] [--questions 48] [--batch-sizes 1,8] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import parrot
from parrot.eval.data import read_dataset
from parrot.eval.run import answer_dataset
from parrot.eval.sources import DataSource
from parrot.testing import write_tiny_checkpoint


def write_dataset(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")
        w.writerow(cols)
        for i in range(n):
            im = Image.fromarray((rng.random((48 + i % 7, 64, 3)) * 255).astype(np.uint8))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            w.writerow([i, f"Question {i}: what is shown?", "A hint." if i % 3 == 0 else "", "a cat", "a dog",
                        "a bird", "a fish", "ABCD"[i % 4], f"cat{i % 5}", base64.b64encode(buf.getvalue()).decode()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="Model directory [default: the tiny random test model]")
    ap.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "mlx"])
    ap.add_argument("--questions", type=int, default=48)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = Path(args.model) if args.model else write_tiny_checkpoint(root / "tiny")
        write_dataset(root / "bench_en.tsv", args.questions)
        ds = read_dataset(DataSource("bench_en", root / "bench_en.tsv"))
        model = parrot.load(ckpt, backend=args.backend)
        answer_dataset(model, ds, root / "warmup", batch_size=max(sizes), limit=max(sizes), progress=False)
        rates: dict[int, list[float]] = {b: [] for b in sizes}
        files: dict[int, bytes] = {}
        for r in range(args.repeats):
            for b in sizes if r % 2 == 0 else reversed(sizes):
                out = root / f"run{r}-b{b}"
                run = answer_dataset(model, ds, out, batch_size=b, max_tokens=args.max_tokens, progress=False)
                rates[b].append(run.questions_per_s)
                files[b] = (out / "bench_en.tsv").read_bytes()
    cpu = platform.processor() or platform.machine()
    print(f"machine: {platform.platform()}, {cpu}, python {sys.version.split()[0]}")
    print(f"model: {args.model or 'tiny test model'} on {args.backend}; {args.questions} questions, "
          f"max {args.max_tokens} new tokens; medians of {args.repeats}")
    base = statistics.median(rates[sizes[0]])
    for b in sizes:
        med = statistics.median(rates[b])
        print(f"  --batch-size {b:>3}: {med:8.2f} questions/s  ({med / base:.2f}x)")
    same = len(set(files.values())) == 1
    print(f"answers identical across batch sizes: {same}")


if __name__ == "__main__":
    main()
