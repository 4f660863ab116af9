"""LoRA training throughput on CPU: `parrot train --lora` (PEFT adapters, rank 8, on the LLM's attention
and MLP; projector and MoE trained fully beside them) against full stage-2 fine-tuning of the same
model, and against PEFT's LoRA with the same targets on a plain transformers Qwen2ForCausalLM (on
random tokens shaped like our micro-batches: same lengths and padding, same optimizer, gradient
checkpointing and clipping), all measured in the same run (the model and data of scripts/bench_train.py).

    .venv/bin/python scripts/bench_lora.py [--steps 6] [--rounds 2] [--batch-size 4] [--hidden 512] [--layers 8]

Rounds alternate the runs, so all see the same machine load; best and median step over the rounds
(the first step of each round, which pays for warm-up, is left out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench_common import reference_qwen2, reference_rates, write_training_data
from parrot.model.checkpoint import Checkpoint
from parrot.model.config import VisionConfig
from parrot.testing import TinySpec, write_tiny_checkpoint
from parrot.training import train
from parrot.training.config import TrainConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_reference_tokens_per_s(model_dir: Path, data_path: Path, tc: TrainConfig, steps: int) -> list[float]:
    """PEFT's LoRA (rank 8, alpha 160 = scale 20) on a transformers Qwen2ForCausalLM, our micro-batches' shapes."""
    from peft import LoraConfig, get_peft_model

    data, plan, model = reference_qwen2(model_dir, data_path, tc, steps)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=160, target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    return reference_rates(data, plan, model, params, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-lora-"))
    spec = replace(
        TinySpec(), hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        moe_intermediate_size=args.hidden * 2, rope_theta=1e6, moe_weight=0.1, extra_vocab=args.vocab - 384,
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                            image_size=112, patch_size=14, projection_dim=256),
    )
    model_dir = write_tiny_checkpoint(root / "model", spec, seed=0)
    data = write_training_data(root, args.steps * args.batch_size, max_repeats=5)
    tc = TrainConfig(stage=2, model=str(model_dir), data=str(data), image_dir=str(root / "images"),
                     output=str(root / "x"), backend="cpu", batch_size=args.batch_size, grad_accum=1,
                     max_steps=args.steps, num_workers=1, save_every=10**6)
    n_params = sum(int(np.prod(s)) for s in Checkpoint.open(model_dir).files.shapes().values())
    print(f"model: {n_params / 1e6:.1f} M parameters (LLM hidden {args.hidden} x {args.layers} layers, vocab "
          f"{args.vocab}; CLIP 256 x 6, 65 visual tokens; 6 experts), batch {args.batch_size}, {args.steps} steps")
    rates: dict[str, list[float]] = {"full": [], "lora": [], "peft": []}
    for r in range(args.rounds):  # alternate, so all see the same machine load
        for name in ("full", "lora", "peft") if r % 2 == 0 else ("peft", "lora", "full"):
            if name == "peft":
                rates[name] += peft_reference_tokens_per_s(model_dir, data, tc, args.steps)[1:]
                continue
            out = root / f"{name}{r}"
            train(replace(tc, output=str(out), lora=name == "lora"), progress=False)
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            rates[name] += [row["tokens_per_s"] for row in rows[1:]]  # the first step pays for warm-up
    best = {k: max(v) for k, v in rates.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print("                                 best step   median step   (tokens/s)")
    print(f"parrot train (stage 2, full):    {best['full']:9.0f}   {med['full']:11.0f}")
    print(f"parrot train --lora:             {best['lora']:9.0f}   {med['lora']:11.0f}"
          "   PEFT rank 8 on attention + MLP, projector + MoE full")
    print(f"PEFT LoRA on Qwen2ForCausalLM:   {best['peft']:9.0f}   {med['peft']:11.0f}   same token batches, targets")
    print(f"ratio --lora / full (ours):      {best['lora'] / best['full']:9.2f}   {med['lora'] / med['full']:11.2f}")
    print(f"ratio --lora / PEFT LLM alone:   {best['lora'] / best['peft']:9.2f}   {med['lora'] / med['peft']:11.2f}")


if __name__ == "__main__":
    main()
