"""LoRA and QLoRA on the MLX trainer: it learns, adapters reload and fuse exactly, clean errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from train_helpers import read_losses, write_dataset

from conftest import assert_clean_failure, requires_mlx, requires_torch, run_parrot
from parrot.errors import ParrotError
from parrot.model.splice import plan_prompts
from parrot.storage.safetensors_io import CheckpointFiles, SafetensorsFile
from parrot.training.config import TrainConfig

pytestmark = requires_mlx
PROMPT = "What is in the picture?"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n=3)


def _train(output, model, data, image_dir, **kw):
    from parrot.training import train

    args = dict(stage=2, data=str(data), image_dir=str(image_dir), output=str(output), model=str(model),
                backend="mlx", num_workers=0, lora=True, batch_size=3, grad_accum=1, lr=2e-3, warmup_ratio=0.0)
    args.update(kw)
    return train(TrainConfig(**args), progress=False)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_ckpt, dataset):
    return _train(tmp_path_factory.mktemp("lora") / "run", tiny_ckpt, *dataset, max_steps=20)


def _logits(model, image):
    ids = model.encode_prompt(PROMPT, has_image=True)
    return model.logits(ids, model.preprocess(image))


def test_lora_overfits_a_few_samples(lora_run, capsys):
    losses = read_losses(lora_run)
    assert len(losses) == 20
    assert losses[-1] < 0.3 * losses[0], losses  # a large relative decrease on 3 samples


def test_lora_trains_adapters_projector_and_moe_and_saves_them_like_mlx_lm(lora_run, tiny_ckpt):
    cfg = json.loads((lora_run / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == 2
    assert cfg["lora_parameters"] == {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": [
        "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj",
        "self_attn.v_proj"]}
    assert cfg["model"] == str(tiny_ckpt.resolve()) and cfg["parrot"]["base"]["hidden_size"] == 64
    weights = SafetensorsFile(lora_run / "adapters.safetensors").read_all()
    lora = [k for k in weights if k.endswith((".lora_a", ".lora_b"))]
    assert len(lora) == 2 * 7 * 2  # (A, B) x 7 modules x 2 layers
    full = sorted(set(weights) - set(lora))  # LLaVA's LoRA recipe: projector and MoE trained fully beside them
    base = CheckpointFiles(tiny_ckpt)
    assert full == sorted(k.replace("model.", "", 1) for k in base.keys()
                          if k.startswith(("model.mm_projector.", "model.moe_model.")))
    assert np.abs(weights["mm_projector.2.weight"] - base.read("model.mm_projector.2.weight")).max() > 1e-4
    a, b = weights["language_model.model.layers.0.self_attn.q_proj.lora_a"], \
        weights["language_model.model.layers.0.self_attn.q_proj.lora_b"]
    assert a.shape == (64, 8) and b.shape == (8, 64) and np.abs(b).max() > 0  # B starts at zero and trained
    last = SafetensorsFile(lora_run / "checkpoints" / "step-00000020" / "model.safetensors").read_all()
    assert last.keys() == weights.keys() and all(np.array_equal(last[k], weights[k]) for k in last)
    assert not (lora_run / "config.json").exists()  # no copy of the base: an adapter directory


def test_saved_adapter_reloads_to_the_same_logits(tmp_path, tiny_ckpt, dataset):
    import mlx.core as mx

    import parrot
    from parrot.backends.mlx.lora import lora_weights
    from parrot.backends.mlx.train.build import build_model, set_trainable
    from parrot.backends.mlx.train.export import export_adapter
    from parrot.training.source import open_source

    tc = TrainConfig(stage=2, data="x", output="y", model=str(tiny_ckpt), backend="mlx", lora=True,
                     lora_targets=["q_proj", "v_proj", "down_proj", "experts", "projector"], lora_rank=4,
                     lora_alpha=8.0).resolved()
    src = open_source(tc)
    model = build_model(src, seed=0)
    modules = set_trainable(model, tc)
    rng = np.random.default_rng(0)
    model.load_weights([(k, mx.array(rng.standard_normal(v.shape).astype(np.float32) * 0.05))
                        for k, v in lora_weights(model).items()], strict=False)
    model.eval()
    export_adapter(model, src, tc, modules, tmp_path, steps=0)
    image = dataset[1] / "img0.png"
    loaded = parrot.load(tiny_ckpt, backend="mlx", adapter=tmp_path)
    ids = loaded.encode_prompt(PROMPT, has_image=True)
    pixels = mx.array(loaded.preprocess(image))
    want = np.array(model(model.splice(plan_prompts([ids], loaded.num_visual_tokens), model.encode_images(pixels))))[0]
    assert np.abs(loaded.logits(ids, loaded.preprocess(image)) - want).max() < 1e-6
    assert np.abs(_logits(parrot.load(tiny_ckpt, backend="mlx"), image) - want).max() > 1e-2  # it matters
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_parameters"]["scale"] == 2.0  # 8 / 4


@requires_torch
@pytest.mark.parametrize("to", ["mlx", "hf"])
def test_fused_model_equals_base_plus_adapter(tmp_path, lora_run, tiny_ckpt, dataset, to):
    import parrot
    from parrot.convert import convert_checkpoint

    convert_checkpoint(tiny_ckpt, tmp_path / "fused", to=to, adapter=lora_run)
    fused = CheckpointFiles(tmp_path / "fused")
    base = CheckpointFiles(tiny_ckpt)
    lora = SafetensorsFile(lora_run / "adapters.safetensors").read_all()
    m, key = "language_model.model.layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj.weight"
    w = base.read(key).astype(np.float64)
    want = w + 20.0 * (lora[f"{m}.lora_a"].astype(np.float64) @ lora[f"{m}.lora_b"]).T  # W + scale (A B)^T
    got = fused.read(f"{m}.weight" if to == "mlx" else key)
    assert np.abs(got - want).max() < 1e-5 and np.abs(want - w).max() > 1e-3
    image = dataset[1] / "img1.png"
    adapted = _logits(parrot.load(tiny_ckpt, backend="mlx", adapter=lora_run), image)
    for backend in ("mlx", "cpu"):
        assert np.abs(_logits(parrot.load(tmp_path / "fused", backend=backend), image) - adapted).max() < 1e-4
    merged_at_load = _logits(parrot.load(tiny_ckpt, backend="cpu", adapter=lora_run), image)
    assert np.abs(merged_at_load - adapted).max() < 1e-4


def _digest(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


def test_qlora_trains_on_a_4bit_base_and_leaves_it_unchanged(tmp_path, tiny_ckpt, dataset):
    import mlx.nn as nn

    import parrot
    from parrot.convert import convert_checkpoint

    q4 = tmp_path / "q4"
    convert_checkpoint(tiny_ckpt, q4, to="mlx", quantize_bits=4, group_size=32)
    before = _digest(q4)
    out = _train(tmp_path / "qlora", q4, *dataset, max_steps=15, lora_targets=["attention", "mlp", "experts"],
                 lora_dropout=0.05)
    losses = read_losses(out)
    assert losses[-1] < 0.5 * losses[0], losses
    assert _digest(q4) == before
    assert json.loads((out / "run_config.json").read_text())["derived"]["mode"] == "qlora"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["parrot"]["base_quantization"]["bits"] == 4
    assert any(k.startswith("moe_model.experts.5.") for k in SafetensorsFile(out / "adapters.safetensors").tensors)
    model = parrot.load(q4, backend="mlx", adapter=out)
    layer = model.model.language_model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.linear, nn.QuantizedLinear)  # the base stays quantized
    assert isinstance(model.model.moe_model.experts[0].up_proj.linear, nn.QuantizedLinear)
    image = dataset[1] / "img0.png"
    assert np.abs(_logits(model, image) - _logits(parrot.load(q4, backend="mlx"), image)).max() > 1e-2
    # fusing into a quantized base dequantizes first, and says so
    with pytest.warns(UserWarning, match="dequantized weights"):
        convert_checkpoint(q4, tmp_path / "fused", to="mlx", adapter=out)
    assert "quantization" not in json.loads((tmp_path / "fused" / "config.json").read_text())
    assert np.abs(_logits(parrot.load(tmp_path / "fused", backend="mlx"), image) - _logits(model, image)).max() < 1e-3


def test_adapter_on_a_mismatching_base_fails_cleanly(tmp_path, lora_run):
    import parrot
    from parrot.testing import spec_variants, write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "other", spec_variants()[1], seed=3)  # hidden 48, 3 layers
    for backend in ("mlx", "cpu"):
        with pytest.raises(ParrotError, match="does not fit"):
            parrot.load(other, backend=backend, adapter=lora_run)
    p = run_parrot("convert", other, tmp_path / "fused", "--fuse-adapter", lora_run)
    assert_clean_failure(p, "does not fit", "hidden_size")
    assert not (tmp_path / "fused").exists()


def test_adapter_errors_are_clean(tmp_path, lora_run, tiny_ckpt):
    import parrot

    p = run_parrot("chat", "--backend", "mlx", "--model", tiny_ckpt, "--adapter", tmp_path / "none", "-p", "hi")
    assert_clean_failure(p, "--adapter", "not found")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((lora_run / "adapter_config.json").read_text())
    data = (lora_run / "adapters.safetensors").read_bytes()
    (broken / "adapters.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ParrotError, match="adapters.safetensors"):
        parrot.load(tiny_ckpt, backend="mlx", adapter=broken)
    (broken / "adapter_config.json").write_text('{"fine_tune_type": "lora"}')
    with pytest.raises(ParrotError, match="lora_parameters"):
        parrot.load(tiny_ckpt, backend="mlx", adapter=broken)


@pytest.mark.parametrize("flags, needles", [
    (dict(backend="cpu", quantize=4), ("--quantize 4", "--backend cuda", "drop --quantize")),
    (dict(quantize=4), ("--quantize 4", "--backend cuda", "-q 4")),
    (dict(backend="cpu", quantize=8), ("--quantize 8", "4 bits")),
    (dict(backend="cpu", fsdp=True), ("--lora", "--fsdp")),
    (dict(lora=False, lora_only=True), ("--lora-only", "only with --lora")),
    (dict(lora_only=True, mm_projector_lr=1e-3), ("--mm-projector-lr", "--lora-only")),
    (dict(no_moe=True, moe_lr=1e-3), ("--moe-lr", "--no-moe")),
    (dict(eval_every=3), ("--eval-every", "--eval-data")),
    (dict(eval_data=["x.tsv"]), ("--eval-data", "--eval-every")),
    (dict(report_to="mlflow"), ("--report-to", "mlflow")),
    (dict(stage=1), ("--lora", "stage 1")),
    (dict(lora_scale=2.0, lora_alpha=64.0), ("--lora-scale", "--lora-alpha")),
    (dict(lora_targets=["q_proj", "attn_out"]), ("unknown target", "attn_out")),
    (dict(lora_rank=0), ("--lora-rank",)),
    (dict(lora_dropout=1.0), ("--lora-dropout",)),
    (dict(train_vision=True), ("--train-vision",)),
    (dict(no_moe=True, lora_targets=["experts"]), ("experts", "--no-moe")),
    (dict(lora=False, lora_rank=4), ("--lora-rank", "only with --lora")),
])
def test_bad_lora_settings_are_refused(flags, needles):
    args = dict(stage=2, data="d.json", output="o", model="m", backend="mlx", lora=True)
    args.update(flags)
    with pytest.raises(ParrotError) as e:
        TrainConfig(**args).resolved()
    for n in needles:
        assert n in str(e.value)


def test_cli_qlora_on_cpu_and_full_training_on_a_quantized_base_fail_cleanly(tmp_path, tiny_ckpt, dataset):
    from parrot.convert import convert_checkpoint

    data, images = dataset
    common = ["train", "--stage", "2", "--data", data, "--image-dir", images, "--max-steps", "1"]
    p = run_parrot(*common, "--backend", "cpu", "--model", tiny_ckpt, "--lora", "--quantize", "4",
                   "--output", tmp_path / "a")
    assert_clean_failure(p, "--quantize 4", "--backend cuda")
    assert not (tmp_path / "a").exists()
    q8 = tmp_path / "q8"
    convert_checkpoint(tiny_ckpt, q8, to="mlx", quantize_bits=8)
    p = run_parrot(*common, "--backend", "mlx", "--model", q8, "--output", tmp_path / "b")
    assert_clean_failure(p, "quantized", "--lora")
