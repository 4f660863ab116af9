"""Side by side with what users would pick instead: ours against mlx-vlm's `llava` (MLX) and transformers'
`LlavaForConditionalGeneration` (torch), on the same random weights.

The script writes a random Parrot checkpoint (Qwen2 LLM, CLIP tower, mlp2x_gelu projector, Parrot's MoE)
and loads the same tensors into the peer (a LLaVA model: the same Qwen2, the same CLIP, the same
projector, no MoE: the peers lack it). What each side computes for one request:

  ours      CLIP up to layer -2 (the last layer is never run) -> projector -> MoE (6 experts on the visual
            tokens, routed by the prompt's text) -> splice -> Qwen2 prefill -> greedy decode
  ours, MoE off  the same checkpoint with use_moe=false (the visual tokens go to the LLM unchanged)
  mlx-vlm   mlx_vlm.generate.generate_step (its own decode loop) on mlx_vlm.models.llava: all CLIP layers
            (+ post_layernorm), hidden_states[-2] with strategy "full" (CLS kept, as Parrot), projector,
            prefill, greedy decode. Its processor is not used: its llava processor breaks with transformers
            5.24's CLIP image processor (TypeError on `padding=`), so the script builds its input ids
            (N image tokens + the same text ids) and passes the same preprocessed pixels.
  transformers  LlavaForConditionalGeneration.generate (greedy, min_new_tokens = max_new_tokens): CLIP
            with vision_feature_layer -2 and strategy "full", projector, prefill, decode; batch 8 left-padded
            (all rows the same length here, so no padding).

Fairness: same tensors (copied from the Parrot checkpoint), same dtype (float32; MLX also 4-bit, group
64, on the LLM and embeddings of both; our experts too), same pixels, same prompt ids and number of new
tokens (stop tokens ignored). Checked every run: the greedy tokens of the LLM part (a text-only prompt)
are identical on both sides, and with the MoE off the image prompt's tokens are identical too. Both sides
warm (one untimed call each), then rounds in alternating order; medians and the range of per-round
ratios ours / peer (for time to first token lower is better, for tokens/s higher is better).

Time to first token = from the call to the first token (vision + MoE + prefill + first sample).
Decode tokens/s = (n - 1) tokens over the time from the first token to the last (batch 8: x 8 rows).
MLX peak memory = mx.get_peak_memory over the call. The MoE's share: ours with the MoE on minus off.

    .venv/bin/python scripts/bench_peers.py [--rounds 3] [--only mlx|torch] [--device cuda]

mlx-vlm is installed for this benchmark only (pip install --no-deps mlx-vlm==0.7.10 plus requests); it is
not a dependency of the package. On Linux mlx[cpu] runs a reference BLAS: compare MLX only with MLX.
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
from functools import partial
from pathlib import Path

import numpy as np

from bench_common import cpu_name
from parrot.constants import IMAGE_TOKEN_INDEX
from parrot.inference.generation import SamplingParams, generate_stream
from parrot.model.config import VisionConfig
from parrot.storage.safetensors_io import CheckpointFiles
from parrot.testing import TinySpec, write_tiny_checkpoint

LLM = {"model.embed_tokens.": "model.embed_tokens.", "model.layers.": "model.layers.", "model.norm.": "model.norm."}


# ------------------------------------------------------------------------------------------ models
def write_parrot(root: Path, hidden: int, layers: int, vocab: int) -> tuple[Path, Path]:
    """A random Parrot checkpoint and its MoE-off twin (same files, use_moe false)."""
    spec = replace(
        TinySpec(), hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), rope_theta=1e6,
        moe_intermediate_size=hidden, extra_vocab=vocab - 397,
        vision=VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                            image_size=224, patch_size=14, projection_dim=256),
    )
    ckpt = write_tiny_checkpoint(root / "parrot", spec, seed=0)
    off = root / "parrot-moe-off"
    off.mkdir()
    for f in ckpt.iterdir():
        if f.name != "config.json":
            (off / f.name).symlink_to(f.resolve())
    cfg = json.loads((ckpt / "config.json").read_text())
    (off / "config.json").write_text(json.dumps({**cfg, "use_moe": False}, indent=2))
    return ckpt, off


def peer_tensors(ckpt: Path) -> tuple[dict, dict, dict]:
    """(LLM tensors by official name, full CLIP tower tensors `vision_model.*`, projector {1: .., 2: ..})."""
    files = CheckpointFiles(ckpt)
    llm = {k: np.asarray(files.read(k)) for k in files.keys() if k.startswith(tuple(LLM)) or k == "lm_head.weight"}
    tower = CheckpointFiles(ckpt / "clip-vit-tiny")
    clip = {k: np.asarray(tower.read(k)) for k in tower.keys()}
    proj = {f"linear_{1 if i == '0' else 2}.{p}": np.asarray(files.read(f"model.mm_projector.{i}.{p}"))
            for i in ("0", "2") for p in ("weight", "bias")}
    return llm, clip, proj


def llava_config(ckpt: Path, image_token: int) -> dict:
    cfg = json.loads((ckpt / "config.json").read_text())
    clip = json.loads((ckpt / "clip-vit-tiny" / "config.json").read_text())
    text_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "vocab_size", "rope_theta", "max_position_embeddings",
                 "tie_word_embeddings")
    return {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
        "text_config": {"model_type": "qwen2", **{k: cfg[k] for k in text_keys}},
        "vision_config": {**{k: v for k, v in clip.items() if k not in ("architectures", "torch_dtype")},
                          "model_type": "clip_vision_model"},
        "image_token_index": image_token, "image_token_id": image_token, "vision_feature_layer": -2,
        "vision_feature_select_strategy": "full", "projector_hidden_act": "gelu", "vocab_size": cfg["vocab_size"],
        "tie_word_embeddings": cfg["tie_word_embeddings"], "multimodal_projector_bias": True,
    }


def write_mlx_vlm_dir(ckpt: Path, out: Path, image_token: int) -> Path:
    from parrot.storage.safetensors_io import save_tensors

    llm, clip, proj = peer_tensors(ckpt)
    w = {"language_model." + k: v for k, v in llm.items()}
    w.update({"vision_tower." + k: v for k, v in clip.items()})
    w.update({"multi_modal_projector." + k: v for k, v in proj.items()})
    out.mkdir()
    save_tensors(w, out)
    (out / "config.json").write_text(json.dumps(llava_config(ckpt, image_token), indent=2))
    return out


def prompt_ids(model, text_tokens: int, seed: int = 1) -> list[int]:
    tok = model.tokenizer
    special = tok.special_ids()
    pool = np.array([i for i in range(min(tok.vocab_size, model.config.vocab_size)) if i not in special])
    return np.random.default_rng(seed).choice(pool, size=text_tokens).tolist()


def images(model, n: int) -> np.ndarray:
    from parrot.inference.bench import synthetic_image

    return np.concatenate([model.preprocess(synthetic_image(model, seed=i)) for i in range(n)])


# ------------------------------------------------------------------------------------------ timing
def ours_call(model, ids: list[int], pixels, n: int) -> dict:
    from parrot.inference.generation import ImageCache

    model.reset_peak_memory()
    r = generate_stream(model, ids, pixels, SamplingParams(max_tokens=n), images=ImageCache(1),
                        stop=frozenset()).consume()
    assert r.generation_tokens == n, r.generation_tokens
    return {"ttft": r.time_to_first_token, "tps": r.generation_tps, "peak": model.peak_memory() / 2**30,
            "tokens": r.tokens}


def ours_batch(model, ids: list[int], pixels: np.ndarray, n: int) -> dict:
    from parrot.inference.batch import Request, generate_batch

    reqs = [Request("", pixels[i:i + 1], SamplingParams(max_tokens=n), input_ids=ids) for i in range(len(pixels))]
    rs = generate_batch(model, reqs, stop=frozenset())
    # generation_tps of a batch is already the whole batch's rate
    return {"ttft": rs[0].time_to_first_token, "tps": rs[0].generation_tps, "tokens": rs[0].tokens}


def stamps_rate(t0: float, stamps: list[float], rows: int = 1) -> tuple[float, float]:
    return stamps[0] - t0, rows * (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)


def mlx_vlm_call(peer, ids: list[int], pixels, n: int, image_token: int, num_visual: int) -> dict:
    import mlx.core as mx
    from mlx_vlm.generate.ar import generate_step

    full = ([image_token] * num_visual if pixels is not None else []) + list(ids)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    x = mx.array([full])
    px = None if pixels is None else mx.array(pixels)
    toks, stamps = [], []
    for tok, _ in generate_step(x, peer, px, None, max_tokens=n, temperature=0.0):
        stamps.append(time.perf_counter())
        toks.append(int(tok))
        if len(toks) == n:
            break
    ttft, tps = stamps_rate(t0, stamps)
    return {"ttft": ttft, "tps": tps, "peak": mx.get_peak_memory() / 2**30, "tokens": toks}


class Stamps:
    """A transformers streamer that records when each generated step arrives (the first put is the prompt)."""

    def __init__(self):
        self.times, self.tokens, self.prompt_seen = [], [], False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.tokens.append(value.reshape(-1).tolist())

    def end(self):
        pass


def hf_call(peer, ids: list[int], pixels, n: int, image_token: int, num_visual: int, device) -> dict:
    import torch

    rows = 1 if pixels is None else len(pixels)
    full = ([image_token] * num_visual if pixels is not None else []) + list(ids)
    x = torch.tensor([full] * rows, device=device)
    kw = {} if pixels is None else {"pixel_values": torch.from_numpy(pixels).to(device)}
    s = Stamps()
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        peer.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, streamer=s, pad_token_id=0, **kw)
    ttft, tps = stamps_rate(t0, s.times, rows)
    return {"ttft": ttft, "tps": tps, "tokens": [t[0] for t in s.tokens]}


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ report
def alternate(rounds: int, sides: dict) -> dict[str, list[dict]]:
    """Each side once untimed (warm), then `rounds` rounds, the order rotated every round."""
    names = list(sides)
    for name in names:
        sides[name]()
    out = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        if r % 2:
            order = order[::-1]
        for name in order:
            out[name].append(sides[name]())
    return out


def med(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def ratio_range(a: list[dict], b: list[dict], key: str) -> str:
    per = [x[key] / y[key] for x, y in zip(a, b)]
    return f"{statistics.median(per):.2f} ({min(per):.2f}-{max(per):.2f})"


def table(title: str, res: dict[str, list[dict]], peer: str, ours_names: list[str], memory: bool) -> None:
    print(f"\n{title}")
    head = f"{'side':<22}{'TTFT s':>9}{'decode tok/s':>14}" + (f"{'peak GiB':>10}" if memory else "")
    print(head + f"   {'TTFT ratio vs ' + peer + ' (range)':<44}{'decode ratio (range)'}")
    for name, rs in res.items():
        line = f"{name:<22}{med(rs, 'ttft'):9.3f}{med(rs, 'tps'):14.2f}"
        line += f"{med(rs, 'peak'):10.3f}" if memory else ""
        if name in ours_names:
            line += f"   {ratio_range(rs, res[peer], 'ttft'):<44}{ratio_range(rs, res[peer], 'tps')}"
        print(line)
    if len(ours_names) == 2:
        on, off = (res[n] for n in ours_names)
        moe = [a["ttft"] - b["ttft"] for a, b in zip(on, off)]
        print(f"MoE share of ours' TTFT: {statistics.median(moe):.3f} s of {med(on, 'ttft'):.3f} s "
              f"({100 * statistics.median(moe) / med(on, 'ttft'):.0f}%; per round {min(moe):.3f}-{max(moe):.3f} s)")


def flops_note(model, prompt_positions: int) -> str:
    """Analytic FLOPs of the time to first token (multiply-adds x 2): the peer's (all CLIP layers, projector,
    Qwen2 prefill, the last position's LM head) and the MoE's, which only ours computes."""
    c, v = model.config, model.vision_config
    C, N, kv = c.hidden_size, model.num_visual_tokens, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    layer = C * (2 * C + 2 * kv) + 3 * C * c.intermediate_size
    llm = 2 * prompt_positions * c.num_hidden_layers * layer + 2 * C * c.vocab_size
    Cv = v.hidden_size
    clip = 2 * N * (v.num_hidden_layers * (4 * Cv * Cv + 2 * Cv * v.intermediate_size) + 3 * v.patch_size**2 * Cv)
    proj = 2 * N * (Cv * C + C * C)
    moe = 2 * N * c.num_experts * 3 * C * c.moe_intermediate_size
    peer = llm + clip + proj
    return (f"FLOPs to the first token (analytic): the peer's {peer / 1e9:.1f} G (LLM {llm / 1e9:.1f}, CLIP "
            f"{clip / 1e9:.1f}, projector {proj / 1e9:.2f}); the MoE adds {moe / 1e9:.1f} G = {100 * moe / peer:.0f}% "
            f"(Parrot-7B: ~4%). Ours skips CLIP's last layer (-{clip / v.num_hidden_layers / 1e9:.2f} G).")


def check_same(what: str, a: list[int], b: list[int], required: bool) -> None:
    same = list(a) == list(b)
    print(f"check: {what}: {'identical' if same else 'DIFFER'} ({len(a)} tokens)")
    if required and not same:
        raise SystemExit(f"the two sides do not compute the same function ({what}): {a[:8]} vs {b[:8]}")


# ------------------------------------------------------------------------------------------ runs
def run_mlx(args, root: Path) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx_vlm
    from mlx_vlm.utils import load_model

    import parrot
    from parrot.convert.core import convert_checkpoint

    ckpt, off = write_parrot(root / "mlx", args.mlx_hidden, args.mlx_layers, args.mlx_vocab)
    ours = parrot.load(ckpt, backend="mlx")
    image_token = ours.config.vocab_size - 1
    ids = prompt_ids(ours, args.text_tokens)
    pixels = images(ours, 1)
    nv = ours.num_visual_tokens
    print(f"\n== MLX ({mx.default_device()}, mlx {mx.__version__}, mlx-vlm {mlx_vlm.__version__}): Qwen2 "
          f"{args.mlx_hidden} x {args.mlx_layers} layers (vocab {args.mlx_vocab}), CLIP 256 x 4 at 224 px "
          f"({nv} visual tokens), {nv + len(ids)}-position prompt, {args.new_tokens} new tokens, float32 and 4-bit")
    print(flops_note(ours, nv + len(ids)))
    peer_dir = write_mlx_vlm_dir(ckpt, root / "mlx" / "llava", image_token)
    for bits in (None, 4):
        if bits:
            q = root / "mlx" / "parrot-q4"
            convert_checkpoint(ckpt, q, to="mlx", quantize_bits=bits, group_size=64)
            q_off = root / "mlx" / "parrot-q4-moe-off"
            shutil.copytree(q, q_off)
            c = json.loads((q_off / "config.json").read_text())
            (q_off / "config.json").write_text(json.dumps({**c, "use_moe": False}))
            ours, ours_off = parrot.load(q, backend="mlx"), parrot.load(q_off, backend="mlx")
        else:
            ours, ours_off = parrot.load(ckpt, backend="mlx"), parrot.load(off, backend="mlx")
        peer = load_model(peer_dir)
        if bits:
            nn.quantize(peer.language_model, group_size=64, bits=bits,
                        class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0)
        label = "4-bit" if bits else "float32"
        check_same(f"{label}, text-only prompt (LLM part)", ours_call(ours, ids, None, 16)["tokens"],
                   mlx_vlm_call(peer, ids, None, 16, image_token, nv)["tokens"], required=not bits)
        check_same(f"{label}, image prompt with the MoE off", ours_call(ours_off, [IMAGE_TOKEN_INDEX, *ids], pixels,
                                                                         16)["tokens"],
                   mlx_vlm_call(peer, ids, pixels, 16, image_token, nv)["tokens"], required=not bits)
        n, img_ids = args.new_tokens, [IMAGE_TOKEN_INDEX, *ids]
        res = alternate(args.rounds, {
            "ours": partial(ours_call, ours, img_ids, pixels, n),
            "ours, MoE off": partial(ours_call, ours_off, img_ids, pixels, n),
            "mlx-vlm llava": partial(mlx_vlm_call, peer, ids, pixels, n, image_token, nv),
        })
        table(f"MLX {label}, batch 1, with the image ({args.rounds} rounds, medians)", res, "mlx-vlm llava",
              ["ours", "ours, MoE off"], memory=True)


def hf_llava(ckpt: Path, image_token: int, device):
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(**llava_config(ckpt, image_token))
    cfg.text_config._attn_implementation = cfg.vision_config._attn_implementation = "sdpa"
    cfg._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(cfg)
    llm, clip, proj = peer_tensors(ckpt)
    sd = {("lm_head.weight" if k == "lm_head.weight" else "model.language_model." + k[len("model."):]): v
          for k, v in llm.items()}
    sd.update({"model.vision_tower." + k[len("vision_model."):]: v for k, v in clip.items()})
    sd.update({"model.multi_modal_projector." + k: v for k, v in proj.items()})
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
                                                strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise SystemExit(f"transformers LLaVA: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()


def run_torch(args, root: Path) -> None:
    import torch
    import transformers

    import parrot

    device = torch.device(args.device)
    backend = "cuda" if device.type == "cuda" else "cpu"
    dtype = args.torch_dtype
    ckpt, off = write_parrot(root / "torch", args.torch_hidden, args.torch_layers, args.torch_vocab)
    ours, ours_off = parrot.load(ckpt, backend=backend), parrot.load(off, backend=backend)  # float32 first
    image_token = ours.config.vocab_size - 1
    ids = prompt_ids(ours, args.text_tokens)
    nv = ours.num_visual_tokens
    peer = hf_llava(ckpt, image_token, device)
    print(f"\n== torch {device.type} ({torch.__version__}, {torch.get_num_threads()} threads, transformers "
          f"{transformers.__version__}): Qwen2 {args.torch_hidden} x {args.torch_layers} layers (vocab "
          f"{args.torch_vocab}), CLIP 256 x 4 at 224 px ({nv} visual tokens), {nv + len(ids)}-position prompt, "
          f"{args.new_tokens} new tokens, {dtype}")
    print(flops_note(ours, nv + len(ids)))
    pix8 = images(ours, 8)
    check_same("float32, text-only prompt (LLM part)", ours_call(ours, ids, None, 16)["tokens"],
               hf_call(peer, ids, None, 16, image_token, nv, device)["tokens"], required=True)
    check_same("float32, image prompt with the MoE off",
               ours_call(ours_off, [IMAGE_TOKEN_INDEX, *ids], pix8[:1], 16)["tokens"],
               hf_call(peer, ids, pix8[:1], 16, image_token, nv, device)["tokens"], required=True)
    if dtype != "float32":  # then the timed pair in the benchmark's dtype
        ours, ours_off = parrot.load(ckpt, backend=backend, dtype=dtype), parrot.load(off, backend=backend, dtype=dtype)
        peer = peer.to({"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
        check_same(f"{dtype}, image prompt with the MoE off (rounding may differ)",
                   ours_call(ours_off, [IMAGE_TOKEN_INDEX, *ids], pix8[:1], 16)["tokens"],
                   hf_call(peer, ids, pix8[:1], 16, image_token, nv, device)["tokens"], required=False)

    n = args.new_tokens
    img_ids = [IMAGE_TOKEN_INDEX, *ids]
    res = alternate(args.rounds, {
        "ours": lambda: ours_call(ours, img_ids, pix8[:1], n),
        "ours, MoE off": lambda: ours_call(ours_off, img_ids, pix8[:1], n),
        "transformers LLaVA": lambda: hf_call(peer, ids, pix8[:1], n, image_token, nv, device),
    })
    table(f"torch {device.type} batch 1, with the image ({args.rounds} rounds, medians)", res,
          "transformers LLaVA", ["ours", "ours, MoE off"], memory=False)
    res = alternate(args.rounds, {
        "ours": lambda: ours_batch(ours, img_ids, pix8, n),
        "ours, MoE off": lambda: ours_batch(ours_off, img_ids, pix8, n),
        "transformers LLaVA": lambda: hf_call(peer, ids, pix8, n, image_token, nv, device),
    })
    table(f"torch {device.type} batch 8, 8 images ({args.rounds} rounds, medians; tok/s of the whole batch)", res,
          "transformers LLaVA", ["ours", "ours, MoE off"], memory=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("mlx", "torch"), default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--text-tokens", type=int, default=66, help="text ids after the image (257 + 66 = 323)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--mlx-hidden", type=int, default=512)
    ap.add_argument("--mlx-layers", type=int, default=4)
    ap.add_argument("--mlx-vocab", type=int, default=8192)
    ap.add_argument("--torch-hidden", type=int, default=1024)
    ap.add_argument("--torch-layers", type=int, default=8)
    ap.add_argument("--torch-vocab", type=int, default=32000)
    ap.add_argument("--torch-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-peers-"))
    print(f"machine: {platform.system()} {platform.machine()}, {cpu_name()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    try:
        if args.only in (None, "torch"):
            run_torch(args, root)
        if args.only in (None, "mlx"):
            run_mlx(args, root)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
