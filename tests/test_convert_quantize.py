"""`parrot convert -q`: MLX affine quantization of the LLM (and experts), recorded in config.json,
honoured by the loader, within stated tolerances of the float model, smaller by the expected ratio.

The tiny model is 128 wide with intermediate 160 and MoE intermediate 192: at group size 64 the
LLM's down_proj (input 160) must stay float while everything else in the policy is quantized.
Measured on this model (see docs/benchmarks.md for more models and settings): 8-bit top-1
agreement ~0.97-0.99, max |diff| ~0.3 on logits of magnitude ~9; 4-bit ~0.6-0.7 and ~4.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import random_image, requires_mlx, requires_torch, run_parrot
from parrot.convert import convert_checkpoint
from parrot.errors import ParrotError
from parrot.storage.safetensors_io import CheckpointFiles
from parrot.testing import TinySpec, write_tiny_checkpoint

pytestmark = requires_mlx

SPEC = replace(TinySpec(), hidden_size=128, intermediate_size=160, moe_intermediate_size=192, num_hidden_layers=3,
               moe_weight=0.1)
PROMPTS = ["What is in the picture?", "请用中文描述这张图片。", "Answer with the option's letter: A. cat B. dog"]
# tolerances, from the measurements above with margin
TOLERANCE = {8: {"top1": 0.93, "maxdiff": 0.8}, 4: {"top1": 0.45, "maxdiff": 8.0}}
# what the policy quantizes (official names), written independently of parrot.convert.quantize
POLICY = re.compile(r"^(model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.\w+_proj)|model\.embed_tokens|lm_head"
                    r"|model\.moe_model\.experts\.\d+\.\w+_proj)\.weight$")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    src = write_tiny_checkpoint(d / "src", SPEC, seed=21)
    convert_checkpoint(src, d / "float")
    for bits in (8, 4):
        convert_checkpoint(src, d / f"q{bits}", quantize_bits=bits)
    return d


def unpack(wq: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words -> integers, least significant bits first (MLX's packing)."""
    per = 32 // bits
    shifts = np.arange(per, dtype=np.uint32) * bits
    return ((wq[..., None] >> shifts) & ((1 << bits) - 1)).reshape(wq.shape[0], -1)


def compare(a_model, b_model) -> tuple[float, float]:
    agree = total = 0
    maxdiff = 0.0
    for i, prompt in enumerate(PROMPTS):
        ids = a_model.encode_prompt(prompt, has_image=True)
        pixels = a_model.preprocess(random_image(29, 37, seed=i))
        a, b = a_model.logits(ids, pixels), b_model.logits(ids, pixels)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        maxdiff = max(maxdiff, float(np.abs(a - b).max()))
    return agree / total, maxdiff


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_weights_are_mlx_affine_within_one_step(models, bits):
    src, out = CheckpointFiles(models / "src"), CheckpointFiles(models / f"q{bits}")
    checked = 0
    for k in out.keys():
        if not k.endswith(".scales"):
            continue
        base = k.removesuffix(".scales")
        official = base.replace("language_model.", "", 1).replace("moe_model.", "model.moe_model.", 1) + ".weight"
        w = src.read(official)
        q = unpack(out.read(base + ".weight"), bits).astype(np.float32)
        scales, biases = out.read(k), out.read(base + ".biases")
        groups = q.shape[1] // scales.shape[1]
        w_hat = (q.reshape(q.shape[0], scales.shape[1], groups) * scales[..., None] + biases[..., None])
        err = np.abs(w_hat.reshape(w.shape) - w).reshape(scales.shape + (groups,)).max(-1)
        assert (err <= np.abs(scales) * 1.0001 + 1e-7).all(), k  # MLX scales may be negative
        checked += 1
    assert checked > 0


def test_policy_decides_what_is_quantized_and_records_it(models, tmp_path):
    out = CheckpointFiles(models / "q4")
    scaled = {k.removesuffix(".scales") for k in out.keys() if k.endswith(".scales")}
    src = CheckpointFiles(models / "src")
    expected = {k for k in src.keys() if POLICY.match(k) and src.info(k).shape[-1] % 64 == 0}
    assert len(expected) > 0 and len(expected) < len([k for k in src.keys() if POLICY.match(k)])
    mlx_names = {("language_model." + k if not k.startswith("model.moe_model.") else k[len("model."):])
                 .removesuffix(".weight") for k in expected}
    assert scaled == mlx_names
    # down_proj (input 160) stays float, bit-exact
    w = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(out.read("language_model." + w), src.read(w))
    q = json.loads((models / "q4" / "config.json").read_text())["quantization"]
    assert (q["group_size"], q["bits"], q["mode"]) == (64, 4, "affine")
    assert "language_model.model.layers.*.mlp.down_proj" in q["kept_float"]
    assert "moe_model.experts.*.down_proj" in q["quantized"]  # input 192 divides by 64
    assert {"vision_tower", "mm_projector", "moe_model.gate"} <= set(q["kept_float"])

    proc = run_parrot("convert", models / "src", tmp_path / "float-parts", "-q", "4", "--no-quantize-experts",
                      "--no-quantize-embeddings")
    assert proc.returncode == 0, proc.stderr
    keys = CheckpointFiles(tmp_path / "float-parts").keys()
    assert not any(("experts" in k or "embed" in k or "lm_head" in k) and k.endswith(".scales") for k in keys)
    assert "language_model.model.layers.0.mlp.up_proj.scales" in keys
    kept = json.loads((tmp_path / "float-parts" / "config.json").read_text())["quantization"]["kept_float"]
    assert {"moe_model.experts", "language_model.lm_head", "language_model.model.embed_tokens"} <= set(kept)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_logits_within_tolerance_of_float_model(models, bits):
    import parrot

    float_model = parrot.load(models / "float", backend="mlx")
    top1, maxdiff = compare(float_model, parrot.load(models / f"q{bits}", backend="mlx"))
    print(f"{bits}-bit vs float: top-1 agreement {top1:.3f}, max |diff| {maxdiff:.3f}")
    assert top1 >= TOLERANCE[bits]["top1"]
    assert maxdiff <= TOLERANCE[bits]["maxdiff"]
    assert maxdiff > 1e-3  # it really is a different (quantized) model


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_files_shrink_by_the_expected_ratio(models, bits):
    src = CheckpointFiles(models / "src")
    expected = 0
    quantized_src = quantized_out = 0
    for k in src.keys():
        info = src.info(k)
        if POLICY.match(k) and info.shape[-1] % 64 == 0:
            out_, in_ = info.shape
            q_bytes = out_ * in_ * bits // 8 + 2 * out_ * (in_ // 64) * 4  # packed + fp32 scales and biases
            expected += q_bytes
            quantized_src += info.nbytes
            quantized_out += q_bytes
        else:
            expected += info.nbytes
    out = CheckpointFiles(models / f"q{bits}")
    data = sum(out.info(k).nbytes for k in out.keys())
    assert data == expected
    assert quantized_out / quantized_src == pytest.approx((bits + 2 * 32 / 64) / 32)
    header_slack = 64 * 1024
    assert out.total_bytes() <= expected + header_slack
    assert out.total_bytes() < src.total_bytes() * (0.5 if bits == 8 else 0.4)


@requires_torch
def test_quantized_to_hf_dequantizes_with_a_warning_and_keeps_the_function(models, tmp_path):
    import parrot

    proc = run_parrot("convert", models / "q4", tmp_path / "hf", "--to", "hf")
    assert proc.returncode == 0, proc.stderr
    assert "Warning:" in proc.stderr and "lossy" in proc.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization" not in config
    files = CheckpointFiles(tmp_path / "hf")
    assert files.info("model.layers.0.self_attn.q_proj.weight").dtype == "F32"
    q_model = parrot.load(models / "q4", backend="mlx")
    torch_model = parrot.load(tmp_path / "hf", backend="cpu")
    ids = q_model.encode_prompt(PROMPTS[0], has_image=True)
    pixels = q_model.preprocess(random_image(29, 37, seed=0))
    assert np.abs(q_model.logits(ids, pixels) - torch_model.logits(ids, pixels)).max() <= 1e-4


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [8, 4])
def test_every_quantized_variant_loads_with_the_modules_its_config_records(models, tmp_path, bits, group_size):
    import mlx.nn as nn

    import parrot

    for experts in (True, False):
        out = tmp_path / f"q{experts}"
        convert_checkpoint(models / "src", out, quantize_bits=bits, group_size=group_size, quantize_experts=experts)
        model = parrot.load(out, backend="mlx")
        quantized = {p for p, m in model.model.named_modules()
                     if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding)}
        stored = {k.removesuffix(".scales") for k in CheckpointFiles(out).keys() if k.endswith(".scales")}
        assert quantized == stored and quantized
        for m in model.model.named_modules():
            if m[0] in quantized:
                assert (m[1].bits, m[1].group_size) == (bits, group_size)
        assert any("experts" in p for p in quantized) == experts
        assert ("language_model.model.layers.0.mlp.down_proj" in quantized) == (160 % group_size == 0)


def test_loader_refuses_weights_that_disagree_with_the_record(models, tmp_path):
    import shutil

    import parrot

    bad = tmp_path / "bad"
    shutil.copytree(models / "q8", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization"]["quantized"].remove("language_model.lm_head")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ParrotError, match="language_model.lm_head is stored quantized"):
        parrot.load(bad, backend="mlx")
    cfg["quantization"]["quantized"] += ["language_model.lm_head", "vision_tower.vision_model.encoder.layers.*.mlp.fc1"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ParrotError, match=r"records vision_tower.*fc1 as quantized"):
        parrot.load(bad, backend="mlx")


def test_mlx_lm_per_module_quantization_entries_are_honoured(models, tmp_path):
    """mlx-lm's convention for mixed precision: `quantization[module] = {group_size, bits}`."""
    import shutil

    import mlx.core as mx

    import parrot
    from parrot.storage.safetensors_io import save_tensors

    mixed = tmp_path / "mixed"
    shutil.copytree(models / "q4", mixed)
    files = CheckpointFiles(mixed)
    tensors = {k: files.read(k) for k in files.keys()}
    module = "language_model.model.layers.0.self_attn.q_proj"
    w = CheckpointFiles(models / "src").read("model.layers.0.self_attn.q_proj.weight")
    wq, s, b = (np.array(a) for a in mx.quantize(mx.array(w), group_size=32, bits=8))
    tensors.update({f"{module}.weight": wq, f"{module}.scales": s, f"{module}.biases": b})
    for p in mixed.glob("*.safetensors"):
        p.unlink()
    save_tensors(tensors, mixed)
    cfg = json.loads((mixed / "config.json").read_text())
    cfg["quantization"][module] = {"group_size": 32, "bits": 8}
    (mixed / "config.json").write_text(json.dumps(cfg))

    model = parrot.load(mixed, backend="mlx")
    q_proj = dict(model.model.named_modules())[module]
    assert (q_proj.bits, q_proj.group_size) == (8, 32)
    x = mx.array(np.random.default_rng(0).standard_normal((3, SPEC.hidden_size)).astype(np.float32))
    bias = CheckpointFiles(models / "src").read("model.layers.0.self_attn.q_proj.bias")
    np.testing.assert_allclose(np.array(q_proj(x)), np.array(x) @ w.T + bias, atol=0.05)
    # and converting it back dequantizes that module with its own settings
    with pytest.warns(UserWarning, match="lossy"):
        convert_checkpoint(mixed, tmp_path / "hf", to="hf")
    back = CheckpointFiles(tmp_path / "hf").read("model.layers.0.self_attn.q_proj.weight")
    assert np.abs(back - w).max() <= np.abs(s).max() * 1.0001


def test_quantized_mlx_source_converts_to_float_or_requantized_mlx(models, tmp_path):
    import parrot

    with pytest.warns(UserWarning, match="lossy"):
        convert_checkpoint(models / "q8", tmp_path / "float", dtype="float32")
    assert not any(k.endswith(".scales") for k in CheckpointFiles(tmp_path / "float").keys())
    assert "quantization" not in json.loads((tmp_path / "float" / "config.json").read_text())
    with pytest.warns(UserWarning, match="second rounding"):
        convert_checkpoint(models / "q8", tmp_path / "again", quantize_bits=8)
    q8 = parrot.load(models / "q8", backend="mlx")
    ids = q8.encode_prompt(PROMPTS[1], has_image=True)
    pixels = q8.preprocess(random_image(29, 37, seed=1))
    ref = q8.logits(ids, pixels)
    assert np.abs(parrot.load(tmp_path / "float", backend="mlx").logits(ids, pixels) - ref).max() <= 1e-4
    top1, _ = compare(q8, parrot.load(tmp_path / "again", backend="mlx"))
    assert top1 >= 0.95


def test_model_with_no_divisible_layer_is_written_float_with_a_warning(tmp_path, tiny_ckpt):
    with pytest.warns(UserWarning, match="no layer has an input size divisible by the group size 128"):
        result = convert_checkpoint(tiny_ckpt, tmp_path / "out", quantize_bits=4, group_size=128)
    assert result.quantization is None
    assert "quantization" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert not any(k.endswith(".scales") for k in CheckpointFiles(tmp_path / "out").keys())


def test_quantize_options_are_checked(tiny_ckpt, tmp_path):
    with pytest.raises(ParrotError, match="--to mlx"):
        convert_checkpoint(tiny_ckpt, tmp_path / "x", to="hf", quantize_bits=4)
    with pytest.raises(ParrotError, match="--quantize 3"):
        convert_checkpoint(tiny_ckpt, tmp_path / "x", quantize_bits=3)
    with pytest.raises(ParrotError, match="--group-size 48"):
        convert_checkpoint(tiny_ckpt, tmp_path / "x", quantize_bits=4, group_size=48)
    assert not Path(tmp_path / "x").exists()


def test_bf16_source_quantizes_with_bf16_scales_and_loads(tmp_path):
    import parrot

    src = write_tiny_checkpoint(tmp_path / "src", SPEC, seed=3, dtype="bfloat16")
    convert_checkpoint(src, tmp_path / "q8", quantize_bits=8)
    files = CheckpointFiles(tmp_path / "q8")
    assert files.info("language_model.model.layers.0.self_attn.q_proj.scales").dtype == "BF16"
    assert files.info("mm_projector.0.weight").dtype == "BF16"
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = parrot.load(tmp_path / "q8", backend="mlx")
    assert model.dtype == "bfloat16"
    reference = parrot.load(src, backend="mlx", dtype="float32")
    top1, _ = compare(reference, model)
    assert top1 >= 0.8
