"""Stage-2 training throughput of one device under each sharding strategy, in one process (world size 1):
plain loop (bf16 autocast), FSDP2 and DeepSpeed ZeRO-3, and LoRA / QLoRA (`--lora`, `--lora --quantize 4`:
adapters on the frozen LLM, projector and MoE trained fully), on a mid-size random Parrot with an image in
every sample (~1k tokens). Prints tokens/s/GPU, MFU and peak memory per strategy, and the ratio to the
plain loop measured in the same call (`scripts/gpu_check.sh` runs it).

    python scripts/bench_gpu_train.py prepare DIR [--small]          # model + data (once)
    python scripts/bench_gpu_train.py run DIR --strategy fsdp|zero3|single|lora|qlora [--steps 8] [--device cuda]

MFU = model FLOPs per step / (step time x peak bf16 dense FLOP/s of the GPU), model FLOPs per step =
6 x (LLM params without the input embeddings) x tokens  (trained: forward + backward)
+ 6 x (projector + MoE params) x visual tokens          (trained; every expert runs on every visual token)
+ 2 x (CLIP tower params used) x visual tokens          (frozen: forward only).
With LoRA the frozen LLM costs 4 x params x tokens (forward, and the backward to its inputs; no weight
gradients; the adapters' own FLOPs are negligible). Attention-score FLOPs and the recomputation of
gradient checkpointing are not counted (model FLOPs, not hardware FLOPs), so MFU here is a lower bound
of the hardware's utilisation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from parrot.model.config import VisionConfig
from parrot.testing import TinySpec, write_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.0}
TEXT = ("The quick brown fox jumps over the lazy dog while a red apple rests on the wooden table next to a cup "
        "of tea, and a cat sits on the window sill watching the rain. ")


def spec_for(small: bool) -> TinySpec:
    if small:  # CPU dry run: the same code paths in seconds
        return replace(TinySpec(), extra_vocab=600)
    # ~0.9 B parameters: a Qwen1.5-0.5B-like LLM (vocab 32k), CLIP ViT-L/14-336, 6 experts
    return replace(
        TinySpec(), hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, moe_intermediate_size=2048, rope_theta=1e6, moe_weight=0.1,
        extra_vocab=32000 - 397,
        vision=VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, projection_dim=768),
    )


def prepare(root: Path, small: bool, n: int = 64) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_tiny_checkpoint(root / "model", spec_for(small), seed=0, dtype="bfloat16")
    rng = np.random.default_rng(0)
    (root / "images").mkdir(exist_ok=True)
    samples = []
    repeats = 1 if small else 5  # ~450 text tokens + 577 visual tokens at full size
    for i in range(n):
        Image.fromarray((rng.random((300 + i, 400, 3)) * 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
        convs = [{"from": "human", "value": "<image>\nDescribe the image in detail."},
                 {"from": "gpt", "value": TEXT * repeats}]
        samples.append({"id": str(i), "image": f"{i}.png", "conversations": convs})
    (root / "data.json").write_text(json.dumps(samples))
    print(f"prepared {root}")


def model_flops_per_step(model_dir: Path, rows: list[dict], batch: int, lora: bool = False) -> tuple[float, dict]:
    from parrot.model.checkpoint import Checkpoint

    ck = Checkpoint.open(model_dir)
    cfg, v = ck.config, ck.tower.config
    shapes = {k: int(np.prod(s)) for k, s in ck.files.shapes().items()}
    vision_used = cfg.vision_layers_used(v)

    def used_vision(k: str) -> bool:
        if "post_layernorm" in k:
            return False
        if ".encoder.layers." in k:
            return int(k.split(".encoder.layers.")[1].split(".")[0]) < vision_used
        return True

    p = {
        "llm": sum(n for k, n in shapes.items() if not k.startswith(("model.vision_tower.", "model.mm_projector.",
                                                                     "model.moe_model.", "model.embed_tokens."))),
        "proj_moe": sum(n for k, n in shapes.items() if k.startswith(("model.mm_projector.", "model.moe_model."))),
        "vision": sum(n for k, n in shapes.items() if k.startswith("model.vision_tower.") and used_vision(k)),
    }
    visual = cfg.num_visual_tokens(v) * batch  # every sample has one image
    tokens = statistics.mean(r["num_tokens"] for r in rows)
    flops = (4 if lora else 6) * p["llm"] * tokens + 6 * p["proj_moe"] * visual + 2 * p["vision"] * visual
    return flops, p


def peak_tflops(name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def run(root: Path, strategy: str, steps: int, batch: int, device: str, peak: float | None) -> dict:
    import torch

    from parrot.training import train
    from parrot.training.config import TrainConfig

    out = root / f"run-{strategy}"
    extra = {"fsdp": {"fsdp": True}, "zero3": {"deepspeed": str(REPO / "configs" / "zero3.json")},
             "zero2": {"deepspeed": str(REPO / "configs" / "zero2.json")}, "single": {},
             "lora": {"lora": True}, "qlora": {"lora": True, "quantize": 4}}[strategy]
    tc = TrainConfig(stage=2, model=str(root / "model"), data=str(root / "data.json"), image_dir=str(root / "images"),
                     output=str(out), backend=device, batch_size=batch, grad_accum=1, max_steps=steps + 1,
                     save_every=10**6, num_workers=2, max_length=2048, lr=2e-5, **extra)
    t0 = time.perf_counter()
    train(tc, stop_after=steps, progress=False)  # max_steps = steps + 1: no checkpoint, no export
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[2:] if len(rows) > 3 else rows[1:]  # the first steps pay for warm-up / allocator growth
    tok_s = statistics.median(r["tokens_per_s"] for r in timed)
    flops, params = model_flops_per_step(root / "model", timed, batch, lora=strategy in ("lora", "qlora"))
    step_s = statistics.median(r["num_tokens"] / r["tokens_per_s"] for r in timed)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak or (peak_tflops(name) if device == "cuda" else None)
    res = {
        "strategy": strategy, "device": name, "steps_timed": len(timed), "batch": batch,
        "tokens_per_step": statistics.mean(r["num_tokens"] for r in timed), "tokens_per_s_per_gpu": tok_s,
        "step_s": step_s, "model_tflop_per_step": flops / 1e12,
        "mfu": (flops / step_s) / (peak * 1e12) if peak else None,
        "peak_memory_gib": max((r.get("peak_memory_gib", 0.0) for r in rows), default=0.0),
        "losses": [round(r["loss"], 4) for r in rows], "params_m": {k: v / 1e6 for k, v in params.items()},
        "wall_s": wall,
    }
    print("RESULT " + json.dumps(res), flush=True)
    return res


def summarize(results: list[dict]) -> None:
    base = next((r for r in results if r["strategy"] == "single"), None)
    print(f"{'strategy':>8} {'tokens/s/GPU':>13} {'step s':>7} {'MFU':>6} {'peak GiB':>9} {'vs single':>9}")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        ratio = f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.2f}" if base else "n/a"
        print(f"{r['strategy']:>8} {r['tokens_per_s_per_gpu']:13.0f} {r['step_s']:7.3f} {mfu:>6} "
              f"{r['peak_memory_gib']:9.2f} {ratio:>9}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("root", type=Path)
    p.add_argument("--small", action="store_true", help="tiny model (CPU dry run)")
    r = sub.add_parser("run")
    r.add_argument("root", type=Path)
    r.add_argument("--strategy", choices=["single", "fsdp", "zero3", "zero2", "lora", "qlora"], required=True)
    r.add_argument("--steps", type=int, default=8)
    r.add_argument("--batch-size", type=int, default=4)
    r.add_argument("--device", default="cuda")
    r.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 dense TFLOP/s (default: by GPU name)")
    s = sub.add_parser("summary", help="table of the RESULT lines of a log")
    s.add_argument("log", type=Path)
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.root, a.small)
    elif a.cmd == "run":
        run(a.root, a.strategy, a.steps, a.batch_size, a.device, a.peak_tflops)
    else:
        lines = [x for x in a.log.read_text(errors="replace").splitlines() if x.startswith("RESULT ")]
        results = [json.loads(x[len("RESULT "):]) for x in lines]
        if not results:
            sys.exit("no RESULT lines")
        summarize(results)


if __name__ == "__main__":
    main()
