"""Generation speed: Parrot's MLX decode loop against mlx-lm's own, on the same Qwen2 weights; torch CPU too.

Writes a random Parrot checkpoint with a mid-size LLM (default: hidden 1024, 8 layers, vocab 32k,
float32) and a small CLIP, and an mlx-lm model directory holding exactly its LLM weights (plain
qwen2 config.json with the same rope_theta and tie setting, safetensors, tokenizer). Then, in one
process, alternating which goes first, it times for the same prompt ids (random, no special
tokens) and the same number of new tokens (the stop token ignored, as mlx-lm's benchmark):

  ours    parrot.inference.generation.generate_stream (the path of model.generate / parrot chat: the
          streaming detokenizer included) on the MLX backend
  mlx-lm  mlx_lm.stream_generate (what mlx_lm.generate runs)

and prints medians over the repeats: decode tokens/s ((n - 1) tokens over the time from the first
token to the last, the same definition for both), the whole call's time, and the ratio ours / mlx-lm
(target >= 0.95). Then the torch CPU backend on the same checkpoint, and the time to first token
with an image (preprocessing + CLIP + projector + MoE + prefill) on both backends.

On Linux, mlx[cpu] uses a reference BLAS: its matrix products are many times slower than torch's,
so compare MLX only with MLX (the ratio), never with torch.

    python scripts/bench_generate.py [--hidden 1024 --layers 8 --prompt-tokens 32 --gen-tokens 24 --repeats 9]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import parrot
from bench_common import cpu_name
from parrot.inference.bench import synthetic_image, synthetic_prompt
from parrot.inference.generation import SamplingParams, generate_stream
from parrot.model.config import ParrotConfig, VisionConfig
from parrot.model.tokenizer import copy_tokenizer_files
from parrot.storage.safetensors_io import CheckpointFiles, save_tensors
from parrot.testing import TinySpec, write_tiny_checkpoint

LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")


def write_models(root: Path, args) -> tuple[Path, Path]:
    """The Parrot checkpoint and an mlx-lm directory with the same LLM weights."""
    spec = replace(
        TinySpec(), hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256), rope_theta=1e6,
        moe_intermediate_size=args.hidden, extra_vocab=args.vocab - 397,
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                            image_size=224, patch_size=14, projection_dim=256),
    )
    ckpt = write_tiny_checkpoint(root / "parrot", spec, seed=0)
    cfg = ParrotConfig.from_file(ckpt / "config.json")
    lm_dir = root / "mlx-lm"
    lm_dir.mkdir()
    files = CheckpointFiles(ckpt)
    save_tensors({k: np.asarray(files.read(k)) for k in files.keys() if k.startswith(LLM_PREFIXES)}, lm_dir)
    (lm_dir / "config.json").write_text(json.dumps({**cfg.llm_dict(), "torch_dtype": "float32"}, indent=2))
    copy_tokenizer_files(ckpt, lm_dir)
    return ckpt, lm_dir


def time_ours(model, ids: list[int], n: int) -> tuple[float, float, float]:
    """(decode tokens/s, whole call seconds, process CPU seconds)."""
    tic, cpu = time.perf_counter(), time.process_time()
    r = generate_stream(model, ids, None, SamplingParams(max_tokens=n), stop=frozenset()).consume()
    total, cpu = time.perf_counter() - tic, time.process_time() - cpu
    assert r.generation_tokens == n, r.generation_tokens
    return r.generation_tps, total, cpu


def time_mlx_lm(lm_model, tokenizer, ids: list[int], n: int) -> tuple[float, float, float]:
    from mlx_lm import stream_generate

    stamps = []
    tic, cpu = time.perf_counter(), time.process_time()
    for _ in stream_generate(lm_model, tokenizer, ids, max_tokens=n):
        stamps.append(time.perf_counter())
    total, cpu = time.perf_counter() - tic, time.process_time() - cpu
    assert len(stamps) == n, len(stamps)
    return (n - 1) / (stamps[-1] - stamps[0]), total, cpu


def mlx_lm_tokens(lm_model, tokenizer, ids: list[int], n: int) -> list[int]:
    from mlx_lm import stream_generate

    return [r.token for r in stream_generate(lm_model, tokenizer, ids, max_tokens=n)]


def machine() -> str:
    cpu = cpu_name()
    import os

    import mlx.core as mx
    import mlx_lm
    import torch

    return (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores; mlx {mx.__version__} "
            f"({mx.default_device()}), mlx-lm {mlx_lm.__version__}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--workdir", type=Path, default=None, help="Keep the models here (default: a temp dir).")
    args = ap.parse_args()

    import mlx.core as mx
    from mlx_lm import load as mlx_lm_load

    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        ckpt, lm_dir = (root / "parrot", root / "mlx-lm") if (root / "mlx-lm").exists() else write_models(root, args)
        print(f"Machine: {machine()}")
        cfg = ParrotConfig.from_file(ckpt / "config.json")
        print(f"Model: Qwen2 hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} "
              f"heads / {cfg.num_key_value_heads} kv, intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}, "
              f"float32 (written in {time.perf_counter() - t:.1f} s)")
        ours = parrot.load(ckpt, backend="mlx", dtype="float32")
        lm_model, tokenizer = mlx_lm_load(str(lm_dir))
        tokenizer._eos_token_ids = set()  # as mlx_lm.benchmark: always max_tokens
        P, N = args.prompt_tokens, args.gen_tokens
        ids = synthetic_prompt(ours, P, with_image=False, seed=0)
        mine = generate_stream(ours, ids, None, SamplingParams(max_tokens=8), stop=frozenset()).consume().tokens
        same = mine == mlx_lm_tokens(lm_model, tokenizer, ids, 8)
        print(f"Prompt {P} tokens, {N} new tokens; {args.repeats} pairs (+1 warmup), alternating which runs first")
        print(f"  same weights: the first 8 greedy tokens of ours and mlx-lm are {'equal' if same else 'DIFFERENT'}")
        time_ours(ours, ids, N), time_mlx_lm(lm_model, tokenizer, ids, N)  # warmup
        runs: dict[str, list[tuple[float, float, float]]] = {"ours": [], "mlx-lm": []}
        for r in range(args.repeats):
            for name in (["ours", "mlx-lm"] if r % 2 == 0 else ["mlx-lm", "ours"]):
                timed = time_ours(ours, ids, N) if name == "ours" else time_mlx_lm(lm_model, tokenizer, ids, N)
                runs[name].append(timed)
        med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in runs.items()}
        pair = sorted(a[0] / b[0] for a, b in zip(runs["ours"], runs["mlx-lm"]))
        print(f"  {'':8} {'decode tok/s':>13} {'call (s)':>9} {'CPU (s)':>8}   (medians)")
        for k, (tps, total, cpu) in med.items():
            print(f"  {k:8} {tps:13.2f} {total:9.3f} {cpu:8.3f}")
        ratio = statistics.median(pair)
        print(f"  ours/mlx-lm decode tokens/s: {ratio:.3f}x (median of the per-pair ratios; they range "
              f"{pair[0]:.3f}-{pair[-1]:.3f}); whole call {med['mlx-lm'][1] / med['ours'][1]:.3f}x; "
              f"CPU time {med['mlx-lm'][2] / med['ours'][2]:.3f}x -> {'OK' if ratio >= 0.95 else 'BELOW'} "
              "(target >= 0.95x)")
        del lm_model
        mx.clear_cache()

        import torch

        image = ours.preprocess(synthetic_image(ours))
        print(f"Time to first token with an image ({ours.num_visual_tokens} visual tokens + {P} text tokens; "
              "preprocessed pixels, vision not cached), and torch CPU on the same checkpoint:")
        print(f"  mlx   {ttft(ours, ids, image, 2)}")
        cpu_model = parrot.load(ckpt, backend="cpu", dtype="float32")
        threads = torch.get_num_threads()
        for n_threads in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(n_threads)
            dec = statistics.median(time_ours(cpu_model, ids, N)[0] for _ in range(3))
            print(f"  torch ({n_threads} thread{'s' if n_threads > 1 else ''}) {ttft(cpu_model, ids, image, 3)}; "
                  f"decode {dec:.2f} tok/s")
        torch.set_num_threads(threads)


def ttft(model, ids: list[int], image, n: int) -> str:
    """Median time to first token (the first of n calls is a warmup)."""
    img = []
    for _ in range(n):
        r = generate_stream(model, [-200, *ids], image, SamplingParams(2), stop=frozenset()).consume()
        img.append((r.time_to_first_token, r.vision_time, r.prefill_tokens))
    img = img[1:]
    tt, vt = statistics.median(x[0] for x in img), statistics.median(x[1] for x in img)
    return f"time to first token {tt:.3f} s (vision {vt:.3f} s, prefill of {img[0][2]} positions {tt - vt:.3f} s)"


if __name__ == "__main__":
    main()
