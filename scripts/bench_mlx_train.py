"""MLX fine-tuning throughput and peak memory: `parrot train --backend mlx --stage 2` in its modes
(full fine-tuning, LoRA, QLoRA on a 4-bit base; gradient checkpointing on and off) on a mid-size
random Parrot, against mlx-lm's own training step on its Qwen2 (LoRA via mlx-lm's
linear_to_lora_layers, or full) on random tokens shaped like our micro-batches (same lengths and
padding), measured in the same run. The ratio is what the Parrot parts (CLIP tower, projector,
MoE, splicing, data pipeline) and our loop cost on top of mlx-lm training the LLM alone.

    .venv/bin/python scripts/bench_mlx_train.py [--steps 6] [--rounds 2] [--batch-size 4] [--hidden 256]
        [--modes full,full-nogc,lora,lora-nogc,qlora]

Modes: full = stage 2's trainable set; lora = rank 8 on the LLM's attention and MLP; qlora = the
same on a 4-bit base; -nogc = without gradient checkpointing (the others recompute each layer).

Rounds alternate ours and the reference so both see the same machine load; best and median step
(the first step of each run, which pays for warm-up, is left out). Neither side uses mx.compile.
On Linux, `mlx[cpu]` runs a reference BLAS: absolute figures say nothing about a Mac, ratios do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm.models import qwen2
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.utils import linear_to_lora_layers

from bench_common import write_training_data
from parrot.convert import convert_checkpoint
from parrot.model.config import ParrotConfig, VisionConfig
from parrot.model.tokenizer import Tokenizer
from parrot.model.tower import resolve_vision_tower
from parrot.testing import TinySpec, write_tiny_checkpoint
from parrot.training import train
from parrot.training.config import TrainConfig
from parrot.training.data import LlavaData
from parrot.training.schedule import StepPlan

MODES = {  # name -> (TrainConfig overrides, quantized base, mlx-lm reference mode)
    "full": (dict(), False, "full"),
    "full-nogc": (dict(gradient_checkpointing=False), False, "full"),
    "lora": (dict(lora=True), False, "lora"),  # rank 8, attention + MLP of every layer
    "lora-nogc": (dict(lora=True, gradient_checkpointing=False), False, "lora"),
    "qlora": (dict(lora=True), True, "lora"),  # the same on a 4-bit base (parrot convert -q 4)
}


def write_data(root: Path, n: int, seed: int = 0) -> Path:
    return write_training_data(root, n, max_repeats=3, seed=seed)


def reference(model_dir: Path, data_path: Path, tc: TrainConfig, steps: int, mode: str) -> tuple[list[float], float]:
    """mlx-lm's Qwen2 trained with its default_loss on random tokens shaped like our micro-batches:
    tokens/s per step and the peak memory (GiB)."""
    cfg = ParrotConfig.from_file(model_dir)
    tower = resolve_vision_tower(cfg, model_dir)
    data = LlavaData(data_path, data_path.parent / "images", Tokenizer.from_dir(model_dir), tower.image,
                     cfg.num_visual_tokens(tower.config), tc.max_length)
    plan = StepPlan(len(data), tc.batch_size, tc.grad_accum, tc.seed, max_steps=steps)
    mx.random.seed(0)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(cfg.llm_dict()))
    if mode == "lora":
        model.freeze()
        linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 20.0, "dropout": 0.0,
                                                         "keys": ["self_attn.q_proj", "self_attn.k_proj",
                                                                  "self_attn.v_proj", "self_attn.o_proj",
                                                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]})
    model.train()
    loss_and_grad = nn.value_and_grad(model, default_loss)
    opt = optim.AdamW(learning_rate=1e-5, weight_decay=0.0, bias_correction=True)
    rng = np.random.default_rng(0)
    rates, peak = [], 0.0
    for s in range(steps):
        mx.reset_peak_memory()
        t0, tokens = time.perf_counter(), 0
        for mb in plan.micro_batches(s):
            lengths = [data.samples[i].length for i in mb]
            batch = mx.array(rng.integers(0, cfg.vocab_size, (len(mb), max(lengths) + 1)).astype(np.int32))
            (loss, _), grads = loss_and_grad(model, batch, mx.array([[0, n] for n in lengths]))
            grads, _ = optim.clip_grad_norm(grads, 1.0)
            opt.update(model, grads)
            mx.eval(loss, model.parameters(), opt.state)
            tokens += sum(lengths)
        rates.append(tokens / (time.perf_counter() - t0))
        peak = max(peak, mx.get_peak_memory() / 2**30)
    return rates, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-mlx-train-"))
    spec = replace(
        TinySpec(), hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        moe_intermediate_size=args.hidden * 2, rope_theta=1e6, moe_weight=0.1, extra_vocab=args.vocab - 384,
        vision=VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
                            image_size=112, patch_size=14, projection_dim=128),
    )
    model_dir = write_tiny_checkpoint(root / "model", spec, seed=0)
    q4 = root / "model-4bit"
    if not q4.exists():
        convert_checkpoint(model_dir, q4, to="mlx", quantize_bits=4)
    data = write_data(root, n=args.steps * args.batch_size)
    print(f"model: LLM hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}; CLIP 128 x 3 at 112 px "
          f"(65 visual tokens); 6 experts of {args.hidden * 2}; batch {args.batch_size}, {args.steps} steps, "
          f"{args.rounds} rounds")
    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores, mlx {mx.__version__} "
          f"({mx.default_device()})")
    for old in root.glob("run-*"):
        shutil.rmtree(old)
    print(f"{'mode':12} {'ours tok/s best/median':>24} {'peak GiB':>9} {'mlx-lm tok/s best/median':>26} "
          f"{'peak GiB':>9} {'ratio (median)':>15}")
    for name in [m.strip() for m in args.modes.split(",") if m.strip()]:
        overrides, quantized, ref_mode = MODES[name]
        tc = TrainConfig(stage=2, model=str(q4 if quantized else model_dir), data=str(data),
                         image_dir=str(root / "images"), backend="mlx", batch_size=args.batch_size, grad_accum=1,
                         max_steps=args.steps, num_workers=2, save_every=10**6, output="", **overrides)
        ours, ref, peak, ref_peak, pads = [], [], 0.0, 0.0, []
        for r in range(args.rounds):
            out = root / f"run-{name}-{r}"
            train(replace(tc, output=str(out)), progress=False)
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            ours += [row["tokens_per_s"] for row in rows[1:]]
            peak = max([peak] + [row["peak_memory_gib"] for row in rows])
            pads += [row["padding_fraction"] for row in rows]
            rates, p = reference(model_dir, data, tc, args.steps, ref_mode)
            ref += rates[1:]
            ref_peak = max(ref_peak, p)
        print(f"{name:12} {max(ours):11.0f} / {statistics.median(ours):<10.0f} {peak:9.3f} "
              f"{max(ref):13.0f} / {statistics.median(ref):<10.0f} {ref_peak:9.3f} "
              f"{statistics.median(ours) / statistics.median(ref):15.2f}")
    print(f"padding fraction of the batches: {statistics.mean(pads):.3f}")


if __name__ == "__main__":
    main()
