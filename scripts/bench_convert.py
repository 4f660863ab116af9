"""Conversion throughput: `parrot convert` (official -> MLX, stored dtype) against a plain user-space
read-and-write loop over the same files, measured in the same run, plus peak RSS.

Writes a synthetic official-layout checkpoint (mid-size config, random bf16 weights, several
shards; >= 3 GB by default), then alternates copy loop and conversion, each in its own process
(so its peak RSS is its own), from the same page-cache state, in alternating order:
  cold: before each run, dirty pages are flushed (sync) and the source's pages dropped from the
        page cache with posix_fadvise(DONTNEED) (no root needed);
  warm: the source is read once just before each run.
Targets: conversion >= 0.5x the copy loop; peak RSS <= largest shard + 1 GB.

    .venv/bin/python scripts/bench_convert.py [--workdir DIR] [--rounds 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_common import cpu_name
from parrot.model.config import KNOWN_VISION_TOWERS, ParrotConfig
from parrot.model.manifest import build_manifest
from parrot.storage.safetensors_io import NAME_TO_NP, ShardedWriter, TensorSpec
from parrot.testing import write_tokenizer

TOWER = "openai/clip-vit-large-patch14-336"


def mid_size_config(vocab: int) -> ParrotConfig:
    """~1.8 B parameters: a 2048-wide, 24-layer Qwen2 + CLIP ViT-L/14-336 + projector + 6 experts."""
    return ParrotConfig(
        vocab_size=vocab, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, rope_theta=1e6, torch_dtype="bfloat16", mm_vision_tower=TOWER, mm_hidden_size=1024,
        num_experts=6, moe_hidden_size=2048, moe_intermediate_size=4096, moe_weight=0.1,
    )


def write_synthetic(directory: Path, max_shard_bytes: int) -> None:
    """Random bf16 weights (views into one random pool, so writing runs at disk speed)."""
    directory.mkdir(parents=True)
    n_tok = write_tokenizer(directory)
    cfg = mid_size_config(32000 + n_tok % 64)
    cfg.save(directory)
    m = build_manifest(cfg, KNOWN_VISION_TOWERS[TOWER])
    shapes = {**m.required, **{k: s for k, s in m.optional.items() if s is not None}}
    bf16 = NAME_TO_NP["bfloat16"]
    plan = [TensorSpec(k, bf16, tuple(s)) for k, s in shapes.items()]
    rng = np.random.default_rng(0)
    largest = max(int(np.prod(s.shape)) for s in plan)
    pool = (0.02 * rng.standard_normal(largest + 4096, dtype=np.float32)).astype(bf16)
    writer = ShardedWriter(directory, plan, max_shard_bytes)
    for spec in plan:
        n = int(np.prod(spec.shape))
        start = int(rng.integers(0, len(pool) - n + 1))
        writer.write(spec.key, pool[start:start + n].reshape(spec.shape))
    writer.close()


# ---------------------------------------------------------------- the two measured programs
PEAK_RSS = """
def peak_rss():  # VmHWM: this process image's peak RSS (ru_maxrss would include the parent's, kept across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""

COPY_LOOP = PEAK_RSS + """
import json, os, sys, time
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
buf = bytearray(64 * 1024 * 1024)
view = memoryview(buf)
t = time.perf_counter()
for name in sorted(os.listdir(src)):
    if not name.endswith(".safetensors"):
        continue
    with open(os.path.join(src, name), "rb", buffering=0) as fi, open(os.path.join(dst, name), "wb", buffering=0) as fo:
        while n := fi.readinto(view):
            fo.write(view[:n])
print(json.dumps({"seconds": time.perf_counter() - t, "maxrss": peak_rss()}))
"""

CONVERT = PEAK_RSS + """
import json, sys, time
from parrot.convert import convert_checkpoint
base = peak_rss()
t = time.perf_counter()
bits = int(sys.argv[3]) if len(sys.argv) > 3 else None
convert_checkpoint(sys.argv[1], sys.argv[2], to="mlx", quantize_bits=bits)
print(json.dumps({"seconds": time.perf_counter() - t, "maxrss": peak_rss(), "import_rss": base}))
"""


def drop_cache(files: list[Path]) -> None:
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(files: list[Path]) -> None:
    os.sync()
    buf = bytearray(16 * 1024 * 1024)
    for f in files:
        with open(f, "rb", buffering=0) as fi:
            while fi.readinto(buf):
                pass


def run(program: str, src: Path, dst: Path, *extra: str) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", program, str(src), str(dst), *extra], check=True,
                         capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    shutil.rmtree(dst)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "out_bytes": size}


def machine() -> str:
    cpu = cpu_name()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="source shard size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quantize", type=int, nargs="*", default=[4], help="also time -q BITS conversions (info)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
    try:
        src = work / "src"
        t = time.perf_counter()
        write_synthetic(src, int(args.shard_gb * 1e9))
        shards = sorted(src.glob("*.safetensors"))
        total = sum(f.stat().st_size for f in shards)
        largest = max(f.stat().st_size for f in shards)
        print(f"machine: {machine()}")
        print(f"synthetic checkpoint: {total / 1e9:.2f} GB in {len(shards)} shards (largest {largest / 1e9:.2f} GB), "
              f"bf16, written in {time.perf_counter() - t:.1f} s")
        results: dict[tuple[str, str], list[dict]] = {}
        for r in range(args.rounds):
            for cache, prepare in (("cold", drop_cache), ("warm", warm_cache)):
                order = [("copy loop", COPY_LOOP), ("convert", CONVERT)]
                for name, program in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
                    prepare(shards)
                    res = run(program, src, work / "out")
                    results.setdefault((cache, name), []).append(res)
                    print(f"  round {r + 1} {cache:4} {name:9}: {total / res['seconds'] / 1e6:7.0f} MB/s "
                          f"({res['seconds']:.2f} s), peak RSS {res['maxrss'] / 1e6:.0f} MB")
        print()
        for cache in ("cold", "warm"):
            copy = min(x["seconds"] for x in results[(cache, "copy loop")])
            conv = min(x["seconds"] for x in results[(cache, "convert")])
            print(f"{cache}: convert {total / conv / 1e6:.0f} MB/s, copy loop {total / copy / 1e6:.0f} MB/s, "
                  f"ratio {copy / conv:.2f}x (best of {args.rounds}; target >= 0.5x)")
        rss = max(x["maxrss"] for k, v in results.items() if k[1] == "convert" for x in v)
        base = max(x["import_rss"] for k, v in results.items() if k[1] == "convert" for x in v)
        for bits in args.quantize:
            warm_cache(shards)
            res = run(CONVERT, src, work / "out", str(bits))
            print(f"warm convert -q {bits} (for information, no target): {total / res['seconds'] / 1e6:.0f} MB/s "
                  f"({res['seconds']:.2f} s), output {res['out_bytes'] / 1e9:.2f} GB, peak RSS "
                  f"{res['maxrss'] / 1e9:.2f} GB")
        print(f"convert peak RSS: {rss / 1e9:.2f} GB ({base / 1e9:.2f} GB after imports); largest shard + 1 GB = "
              f"{(largest + 1e9) / 1e9:.2f} GB -> {'OK' if rss <= largest + 1e9 else 'OVER'}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
