"""What mx.compile buys on the MLX backend: the same work with compilation on and off, alternating rounds in one
process (mx.enable_compile / mx.disable_compile), medians and per-round ratios on / off.

  train     `parrot train --backend mlx --stage 2` steps (compiled: AdamW's per-parameter update, the fused
            quick-GELU / SwiGLU kernels); median step time after the first step; losses compared
  optimizer the AdamW update alone over the model's trainable tree (what the compiled kernel replaces)
  sampling  decode tokens/s with temperature 0.8 / top-p 0.9 (compiled: the sampling step); tokens compared
  ttft      time to first token with an image (CLIP's quick-GELU and the experts' SwiGLU fused)

Compiling on Linux JIT-builds C++ the first time a graph is seen (an untimed warm-up round pays for it).

    .venv/bin/python scripts/bench_compile.py [--rounds 4] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx

import parrot
from bench_common import cpu_name, write_training_data
from parrot.inference.bench import synthetic_image
from parrot.inference.generation import ImageCache, SamplingParams, generate_stream
from parrot.model.config import VisionConfig
from parrot.testing import TinySpec, write_tiny_checkpoint
from parrot.training import train
from parrot.training.config import TrainConfig


def set_compile(on: bool) -> None:
    (mx.enable_compile if on else mx.disable_compile)()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-compile-"))
    spec = replace(
        TinySpec(), hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        moe_intermediate_size=args.hidden * 2, rope_theta=1e6, extra_vocab=args.vocab - 397,
        vision=VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                            image_size=112, patch_size=14, projection_dim=128),
    )
    ckpt = write_tiny_checkpoint(root / "model", spec, seed=0)
    data = write_training_data(root, n=args.steps * 4, max_repeats=3)
    print(f"machine: {platform.system()} {platform.machine()}, {cpu_name()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; mlx {mx.__version__} ({mx.default_device()})")
    print(f"model: Qwen2 {args.hidden} x {args.layers} layers (vocab {args.vocab}), CLIP 128 x 3 at 112 px, 6 experts")

    runs = iter(range(10**6))

    def train_round() -> dict:
        out = root / f"run{next(runs)}"
        tc = TrainConfig(stage=2, model=str(ckpt), data=str(data), image_dir=str(root / "images"), output=str(out),
                         backend="mlx", batch_size=4, grad_accum=1, max_steps=args.steps, num_workers=1,
                         save_every=10**6)
        train(tc, progress=False)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {"time": statistics.median(r["num_tokens"] / r["tokens_per_s"] for r in rows[1:]),
                "losses": [r["loss"] for r in rows]}

    model = parrot.load(ckpt, backend="mlx")
    from parrot.backends.mlx.train.optim import TorchAdamW

    params = model.model.trainable_parameters()
    grads = dict(params)
    mx.eval(params)

    def optimizer_round() -> dict:
        from mlx.utils import tree_map

        opt = TorchAdamW(1e-3, weight_decay=0.1)
        opt.init(params)
        g = tree_map(lambda x: x * 1e-3, grads)
        p = opt.apply_gradients(g, params)
        mx.eval(p, opt.state)
        t = time.perf_counter()
        for _ in range(5):
            p = opt.apply_gradients(g, p)
            mx.eval(p, opt.state)
        return {"time": (time.perf_counter() - t) / 5}

    pixels = model.preprocess(synthetic_image(model, seed=1))
    ids = model.encode_prompt("Describe the image in detail.", True)

    def sampling_round() -> dict:
        r = generate_stream(model, ids, pixels, SamplingParams(max_tokens=32, temperature=0.8,
                            top_p=0.9, seed=3), images=ImageCache(1), stop=frozenset()).consume()
        return {"time": 1 / r.generation_tps, "tokens": r.tokens}

    def ttft_round() -> dict:
        r = generate_stream(model, ids, pixels, SamplingParams(max_tokens=1), images=ImageCache(1),
                            stop=frozenset()).consume()
        return {"time": r.time_to_first_token, "tokens": r.tokens}

    print(f"\n{'work':<12}{'on':>12}{'off':>12}   on / off time (per-round range)   same results")
    for name, fn, unit in (("optimizer", optimizer_round, "ms/update"), ("sampling", sampling_round, "ms/token"),
                           ("ttft", ttft_round, "ms"), ("train", train_round, "ms/step")):
        res = {True: [], False: []}
        for on in (True, False):  # warm: compile (JIT C++) and caches
            set_compile(on)
            fn()
        for r in range(args.rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                set_compile(on)
                res[on].append(fn())
        set_compile(True)
        on_t, off_t = ([x["time"] for x in res[k]] for k in (True, False))
        per = [a / b for a, b in zip(on_t, off_t)]
        same = ""
        for key in ("losses", "tokens"):
            if key in res[True][0]:
                a, b = res[True][0][key], res[False][0][key]
                same = ("identical" if a == b else
                        f"max |d| {max(abs(x - y) for x, y in zip(a, b)):.1e}" if key == "losses" else "DIFFER")
        print(f"{name:<12}{1e3 * statistics.median(on_t):9.2f} ms{1e3 * statistics.median(off_t):9.2f} ms   "
              f"{statistics.median(per):.2f} ({min(per):.2f}-{max(per):.2f})" + " " * 14 + f"{same}  [{unit}]")


if __name__ == "__main__":
    main()
