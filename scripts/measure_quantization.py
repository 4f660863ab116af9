"""Accuracy of `parrot convert -q` on tiny random models: quantized MLX logits against the float
MLX model from the same source, for 8 and 4 bits, with the MoE experts and the embeddings
(embed_tokens + lm_head) quantized or kept float.

Prints, per setting, top-1 agreement and max |logit diff| over every position of several image
prompts, the relative error of the visual tokens after the MoE, and the size of the weights.
The tiny models' widths include some not divisible by 64, so some layers stay float.

    .venv/bin/python scripts/measure_quantization.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("MLX_DISABLE_COMPILE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from parrot.convert import convert_checkpoint  # noqa: E402
from parrot.model.config import VisionConfig  # noqa: E402
from parrot.testing import TinySpec, write_tiny_checkpoint  # noqa: E402

PROMPTS = ["What is in the picture?", "请用中文描述这张图片。", "Answer with the option's letter: A. cat B. dog"]


def specs() -> list[TinySpec]:
    base = TinySpec()
    return [
        # 128-wide: attention/gate/up/experts quantize at group 64; down_proj (in 160) stays float
        replace(base, hidden_size=128, intermediate_size=160, moe_intermediate_size=192, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, moe_weight=0.1),
        # 192-wide MHA, intermediate 320 (not divisible by 64 / 128), 3 experts
        replace(base, hidden_size=192, intermediate_size=320, moe_intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=6, num_key_value_heads=6, num_experts=3, moe_weight=0.5,
                vision=VisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=24, patch_size=6, projection_dim=32)),
    ]


def image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((29, 37, 3)) * 255).astype(np.uint8))


def visual_tokens(model, ids, pixels) -> np.ndarray:
    import mlx.core as mx

    emb = model.embed_prompt(ids, model.image_features(pixels))
    p = ids.index(-200)
    n = model.num_visual_tokens
    return np.array(emb[0, p:p + n].astype(mx.float32))


def measure(float_model, model) -> dict[str, float]:
    agree, total, maxdiff, rel = 0, 0, 0.0, []
    for i, prompt in enumerate(PROMPTS):
        ids = float_model.encode_prompt(prompt, has_image=True)
        pixels = float_model.preprocess(image(i))
        a, b = float_model.logits(ids, pixels), model.logits(ids, pixels)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        maxdiff = max(maxdiff, float(np.abs(a - b).max()))
        va, vb = visual_tokens(float_model, ids, pixels), visual_tokens(model, ids, pixels)
        rel.append(float(np.linalg.norm(va - vb) / np.linalg.norm(va)))
    return {"top1": agree / total, "maxdiff": maxdiff, "visual_rel": max(rel), "scale": float(np.abs(a).max())}


def weight_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def main() -> None:
    import parrot

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for si, spec in enumerate(specs()):
            for seed in (0, 1):
                src = write_tiny_checkpoint(tmp / f"src{si}{seed}", spec, seed=seed)
                fdir = tmp / f"f{si}{seed}"
                convert_checkpoint(src, fdir)
                fm = parrot.load(fdir, backend="mlx")
                for bits in (8, 4):
                    for experts in (True, False):
                        for emb in (True, False):
                            q = tmp / f"q{si}{seed}{bits}{experts}{emb}"
                            convert_checkpoint(src, q, quantize_bits=bits, group_size=64, quantize_experts=experts,
                                               quantize_embeddings=emb)
                            m = measure(fm, parrot.load(q, backend="mlx"))
                            rows.append((si, seed, bits, experts, emb, m, weight_bytes(q) / weight_bytes(fdir)))
    print(f"{'model':>5} {'seed':>4} {'bits':>4} {'experts':>7} {'embed':>5} {'top1':>6} {'max|d|':>7} "
          f"{'|logit|':>7} {'vis.rel':>7} {'size':>5}")
    for si, seed, bits, experts, emb, m, ratio in rows:
        print(f"{si:>5} {seed:>4} {bits:>4} {'q' if experts else 'float':>7} {'q' if emb else 'float':>5} "
              f"{m['top1']:6.3f} {m['maxdiff']:7.3f} {m['scale']:7.2f} {m['visual_rel']:7.4f} {ratio:5.3f}")
    print("\nmeans over models and seeds:")
    for bits in (8, 4):
        for experts in (True, False):
            for emb in (True, False):
                sel = [r for r in rows if r[2] == bits and r[3] == experts and r[4] == emb]
                print(f"  {bits}-bit experts={'q' if experts else 'float':5} embed={'q' if emb else 'float':5}: "
                      f"top-1 {np.mean([r[5]['top1'] for r in sel]):.3f}  max|d| "
                      f"{np.max([r[5]['maxdiff'] for r in sel]):.3f}  visual rel err "
                      f"{np.mean([r[5]['visual_rel'] for r in sel]):.4f}  size {np.mean([r[6] for r in sel]):.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
