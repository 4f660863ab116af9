"""Training throughput on CPU: `parrot train` (stage 2: projector + MoE + LLM, vision frozen) on a
mid-size random Parrot, against a plain transformers Qwen2ForCausalLM training step on the same
token batches (same lengths and padding, same optimizer, same gradient checkpointing), measured in
the same run. The ratio is what the Parrot parts (CLIP tower, projector, MoE, splicing, data
pipeline) cost on top of training the LLM alone. Also `parrot train --packing` (padding-free micro-batches)
on the same data: useful (non-padding) tokens/s packed / padded, the same steps' losses side by side.

    .venv/bin/python scripts/bench_train.py [--steps 8] [--rounds 3] [--batch-size 4] [--hidden 512] [--layers 8]
    .venv/bin/python scripts/bench_train.py --backend mlx --hidden 256 --layers 4 --vocab 8192   # MLX: packed vs padded
    python scripts/bench_train.py --backend cuda --hidden 1024 --layers 8   # bf16; flash-attn varlen if installed

Rounds alternate the two, so both see the same machine load; best and median step over the rounds
(the first step of each round, which pays for warm-up, is left out). On a shared machine the best
step is the stable figure: contention slows single steps several-fold.
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
from parrot import registry
from parrot.model.checkpoint import Checkpoint
from parrot.model.config import VisionConfig
from parrot.testing import TinySpec, write_tiny_checkpoint
from parrot.training import train
from parrot.training.config import TrainConfig


def reference_tokens_per_s(model_dir: Path, data_path: Path, tc: TrainConfig, steps: int) -> list[float]:
    """A transformers Qwen2ForCausalLM trained on random tokens shaped like our micro-batches."""
    data, plan, model = reference_qwen2(model_dir, data_path, tc, steps)
    return reference_rates(data, plan, model, list(model.parameters()), steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--backend", default="cpu", choices=("cpu", "mlx", "cuda"),
                    help="mlx, cuda: packed vs padded only (no transformers reference)")
    ap.add_argument("--max-repeats", type=int, default=5, help="answers of 1..N sentences (the padding's spread)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-train-"))
    spec = replace(
        TinySpec(), hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        moe_intermediate_size=args.hidden * 2,
        rope_theta=1e6, moe_weight=0.1, extra_vocab=args.vocab - 384,
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                            image_size=112, patch_size=14, projection_dim=256),
    )
    model_dir = write_tiny_checkpoint(root / "model", spec, seed=0)
    data = write_training_data(root, n=args.steps * args.batch_size, max_repeats=args.max_repeats)
    tc = TrainConfig(stage=2, model=str(model_dir), data=str(data), image_dir=str(root / "images"),
                     output=str(root / "run0"), backend=args.backend, batch_size=args.batch_size, grad_accum=1,
                     max_steps=args.steps, num_workers=args.num_workers, save_every=10**6)
    n_params = sum(int(np.prod(s)) for s in Checkpoint.open(model_dir).files.shapes().values())
    print(f"model: {n_params / 1e6:.1f} M parameters (LLM hidden {args.hidden} x {args.layers} layers, vocab "
          f"{args.vocab}; CLIP 256 x 6, 65 visual tokens; 6 experts), batch {args.batch_size}, {args.steps} steps")
    ours, ref, pads, packed, pairs, losses = [], [], [], [], [], []

    def run(name: str, packing: bool) -> list[dict]:
        out = root / name
        train(replace(tc, output=str(out), packing=packing), progress=False)
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    for r in range(args.rounds):  # alternate, so all see the same machine load
        # the transformers reference runs on the CPU: only beside a torch backend that trains there
        on_torch_cpu = registry.get(args.backend).device == "cpu"
        sides = ["padded", "packed"] + (["reference"] if on_torch_cpu else [])
        for side in (sides if r % 2 == 0 else sides[::-1]):
            if side == "padded":
                rows = run(f"run{r}", False)
                ours += [row["tokens_per_s"] for row in rows[1:]]  # the first step pays for warm-up
                pads += [row["padding_fraction"] for row in rows]
                a = statistics.median(row["tokens_per_s"] for row in rows[1:])
                losses.append([row["loss"] for row in rows])
            elif side == "packed":
                rows_p = run(f"packed{r}", True)
                packed += [row["tokens_per_s"] for row in rows_p[1:]]
                b = statistics.median(row["tokens_per_s"] for row in rows_p[1:])
                losses.append([row["loss"] for row in rows_p])
            else:
                ref += reference_tokens_per_s(model_dir, data, tc, args.steps)[1:]
        pairs.append(b / a)
    pad = statistics.mean(pads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print("                                 best step   median step   (tokens/s)")
    print(f"parrot train (stage 2):          {max(ours):9.0f}   {statistics.median(ours):11.0f}"
          f"   padding fraction {pad:.3f}, {args.num_workers} loader worker(s), backend {args.backend}")
    print(f"parrot train --packing:          {max(packed):9.0f}   {statistics.median(packed):11.0f}"
          f"   padding fraction 0 (useful tokens/s: the padding is not counted on either row)")
    if ref:
        print(f"transformers Qwen2ForCausalLM:   {max(ref):9.0f}   {statistics.median(ref):11.0f}   same token batches")
        ratio_median = statistics.median(ours) / statistics.median(ref)
        print(f"ratio parrot / LLM alone:        {max(ours) / max(ref):9.2f}   {ratio_median:11.2f}")
    print(f"ratio packed / padded (useful tokens/s): best step {max(packed) / max(ours):.2f}, median step "
          f"{statistics.median(packed) / statistics.median(ours):.2f}; per round (medians) "
          f"{min(pairs):.2f}-{max(pairs):.2f}")
    diff = max(abs(x - y) for x, y in zip(losses[0], losses[1]))
    print(f"losses, padded vs packed (round 1): max |difference| {diff:.2e} over {len(losses[0])} steps")


if __name__ == "__main__":
    main()
