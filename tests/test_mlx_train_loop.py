"""The MLX training loop: trainable sets as on torch, exact resume, gradient checkpointing, export, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from train_helpers import read_losses, write_dataset

from conftest import assert_clean_failure, requires_mlx, requires_torch, run_parrot
from parrot.storage.safetensors_io import CheckpointFiles, SafetensorsFile
from parrot.testing import write_tiny_clip, write_tiny_llm
from parrot.training.config import TrainConfig

pytestmark = requires_mlx


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n=6)


def _train(tmp_path, name, model, data, image_dir, stop_after=None, **kw):
    from parrot.training import train

    args = dict(stage=2, data=str(data), image_dir=str(image_dir), output=str(tmp_path / name), model=str(model),
                backend="mlx", batch_size=2, grad_accum=1, num_workers=0)
    args.update(kw)
    return train(TrainConfig(**args), stop_after=stop_after, progress=False)


def _weights(directory) -> dict[str, np.ndarray]:
    f = CheckpointFiles(directory)
    return {k: f.read(k) for k in f.keys()}


@pytest.mark.parametrize("mode", ["full", "lora-dropout"])
def test_resume_after_a_stop_reproduces_the_uninterrupted_run(tmp_path, tiny_ckpt, dataset, mode):
    common = dict(max_steps=5, save_every=2, lr=3e-3, warmup_ratio=0.2, num_workers=2)
    if mode != "full":
        common.update(lora=True, lora_dropout=0.3, lora_rank=4)
    full = _train(tmp_path, "full", tiny_ckpt, *dataset, **common)
    part = _train(tmp_path, "part", tiny_ckpt, *dataset, stop_after=3, **common)
    assert len(read_losses(part)) == 3  # step 3 logged, not saved: the resume recomputes it
    assert not (part / "config.json").exists() and not (part / "adapters.safetensors").exists()
    _train(tmp_path, "part", tiny_ckpt, *dataset, resume=True, **common)
    assert read_losses(part) == read_losses(full)
    if mode == "full":
        a, b = _weights(full), _weights(part)
    else:
        a = SafetensorsFile(full / "adapters.safetensors").read_all()
        b = SafetensorsFile(part / "adapters.safetensors").read_all()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_of_a_torch_run_is_refused(tmp_path, tiny_ckpt, dataset):
    from parrot.errors import ParrotError

    pytest.importorskip("torch")
    _train(tmp_path, "run", tiny_ckpt, *dataset, backend="cpu", max_steps=2, save_every=1, stop_after=1)
    with pytest.raises(ParrotError, match="backend 'cpu' -> 'mlx'"):
        _train(tmp_path, "run", tiny_ckpt, *dataset, max_steps=2, save_every=1, resume=True)


def test_stage1_changes_only_the_projector(tmp_path, tiny_ckpt, dataset, capsys):
    out = _train(tmp_path, "s1", tiny_ckpt, *dataset, stage=1, max_steps=2, lr=1e-2, warmup_ratio=0.0)
    assert "trainable parameters: 7,296 of" in capsys.readouterr().out  # the projector: 48*64+64 + 64*64+64
    before, after = _weights(tiny_ckpt), _weights(out)
    assert before.keys() == after.keys()  # CLIP's unused last layer is carried too
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    assert changed == sorted(k for k in before if k.startswith("model.mm_projector."))
    assert json.loads((out / "config.json").read_text())["use_moe"] is False
    ckpt = SafetensorsFile(out / "checkpoints" / "step-00000002" / "model.safetensors")
    assert sorted(ckpt.tensors) == ["mm_projector.0.bias", "mm_projector.0.weight", "mm_projector.2.bias",
                                    "mm_projector.2.weight"]


@requires_torch
@pytest.mark.parametrize("stage, no_moe, train_vision", [(1, False, False), (1, False, True), (2, False, False),
                                                         (2, True, False), (2, False, True)])
def test_trainable_sets_equal_the_torch_backend(tiny_ckpt, stage, no_moe, train_vision):
    from mlx.utils import tree_flatten

    from parrot.backends.mlx.train.build import build_model as build_mlx
    from parrot.backends.mlx.train.build import set_trainable as trainable_mlx
    from parrot.backends.torch_cuda.train.build import build_model as build_torch
    from parrot.backends.torch_cuda.train.build import set_trainable as trainable_torch
    from parrot.model.layout import mlx_to_official_key
    from parrot.training.source import open_source

    tc = TrainConfig(stage=stage, data="x", output="y", model=str(tiny_ckpt), no_moe=no_moe, train_vision=train_vision,
                     backend="mlx").resolved()
    t = build_torch(open_source(tc), "cpu", seed=0)
    trainable_torch(t, stage, tc.use_moe, train_vision)
    m = build_mlx(open_source(tc), seed=0)
    trainable_mlx(m, tc)
    want = {n for n, p in t.named_parameters() if p.requires_grad}
    got = {mlx_to_official_key(k) for k, _ in tree_flatten(m.trainable_parameters())}
    assert got == want and len(got) > 3


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_ckpt, dataset):
    common = dict(max_steps=3, lr=3e-3, warmup_ratio=0.0)
    on = _train(tmp_path, "on", tiny_ckpt, *dataset, gradient_checkpointing=True, **common)
    off = _train(tmp_path, "off", tiny_ckpt, *dataset, gradient_checkpointing=False, **common)
    np.testing.assert_allclose(read_losses(on), read_losses(off), rtol=1e-6)
    rows = [json.loads(x) for x in (on / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "padding_fraction", "peak_memory_gib"} <= rows[0].keys()
    assert all(r["peak_memory_gib"] > 0 for r in rows)


def test_grad_checkpoint_recomputes_only_the_wrapped_instances(tiny_ckpt):
    from mlx_lm.models import qwen2

    import parrot
    from parrot.backends.mlx.train.build import build_model, enable_grad_checkpoint
    from parrot.training.source import open_source

    tc = TrainConfig(stage=2, data="x", output="y", model=str(tiny_ckpt), backend="mlx").resolved()
    model = build_model(open_source(tc), seed=0)
    other = parrot.load(tiny_ckpt, backend="mlx").model
    enable_grad_checkpoint(model)
    layer, plain = model.language_model.model.layers[0], other.language_model.model.layers[0]
    assert type(layer).__bases__ == (qwen2.TransformerBlock,)  # this model's layers recompute ...
    assert type(plain) is qwen2.TransformerBlock  # ... other models' do not (mlx-lm patches the class)


def test_mlx_layout_export_loads_with_the_same_logits(tmp_path, tiny_ckpt, dataset):
    import parrot

    common = dict(max_steps=2, lr=3e-3, warmup_ratio=0.0)
    a = _train(tmp_path, "official", tiny_ckpt, *dataset, **common)
    b = _train(tmp_path, "mlx", tiny_ckpt, *dataset, save_layout="mlx", **common)
    assert "language_model.model.norm.weight" in CheckpointFiles(b).keys()
    assert "model.norm.weight" in CheckpointFiles(a).keys()
    image = dataset[1] / "img2.png"
    la, lb = (m.logits(m.encode_prompt("Describe it.", True), m.preprocess(image))
              for m in (parrot.load(a, backend="mlx"), parrot.load(b, backend="mlx")))
    assert np.array_equal(la, lb)


def test_cli_stage1_from_an_llm_then_lora_on_its_output(tmp_path, dataset):
    import parrot

    data, images = dataset
    llm, clip = write_tiny_llm(tmp_path / "qwen2-tiny", seed=1), write_tiny_clip(tmp_path / "clip-tiny", seed=2)
    s1 = run_parrot("train", "--backend", "mlx", "--stage", "1", "--llm", llm, "--vision-tower", clip, "--data", data,
                    "--image-dir", images, "--output", tmp_path / "s1", "--max-steps", "2", "--batch-size", "3",
                    "--grad-accum", "1", "--moe-intermediate-size", "32", "--num-workers", "1")
    assert s1.returncode == 0, s1.stdout + s1.stderr
    assert "trainable parameters: 7,296 of" in s1.stdout and "stage 1: 100%" in s1.stderr
    w_llm, w1 = CheckpointFiles(llm), CheckpointFiles(tmp_path / "s1")
    for k in w_llm.keys():  # stage 1 leaves the LLM as it was
        assert np.array_equal(w1.read(k), w_llm.read(k)), k
    s2 = run_parrot("train", "--backend", "mlx", "--stage", "2", "--model", tmp_path / "s1", "--data", data,
                    "--image-dir", images, "--output", tmp_path / "s2", "--max-steps", "2", "--lora",
                    "--lora-targets", "attention,experts", "--lora-alpha", "16", "--num-layers", "1",
                    "--no-grad-checkpoint")
    assert s2.returncode == 0, s2.stdout + s2.stderr
    cfg = json.loads((tmp_path / "s2" / "adapter_config.json").read_text())
    assert cfg["num_layers"] == 1 and cfg["lora_parameters"]["scale"] == 2.0  # alpha 16 / rank 8
    assert cfg["parrot"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "experts"]
    chat = run_parrot("chat", "--backend", "mlx", "--model", tmp_path / "s1", "--adapter", tmp_path / "s2",
                      images / "img0.png", "-p", "What is in the picture?", "-m", "5")
    assert chat.returncode == 0, chat.stderr
    m = parrot.load(tmp_path / "s1", backend="mlx", adapter=tmp_path / "s2")
    assert m.adapter is not None and len(m.adapter.modules) == 4 + 6 * 3
    assert m.config.use_moe  # the adapter was trained with the MoE on (stage 1 had it off): it stays on


def test_cli_mlx_rejects_distributed_flags(tmp_path, tiny_ckpt, dataset):
    data, _ = dataset
    p = run_parrot("train", "--backend", "mlx", "--stage", "2", "--model", tiny_ckpt, "--data", data, "--output",
                   tmp_path / "o", "--fsdp")
    assert_clean_failure(p, "--fsdp", "--backend mlx")


def test_mlx_training_works_without_torch_installed(tmp_path, tiny_ckpt, dataset):
    """A Mac with only the [mlx] extra: LoRA training, then the adapter loaded, with torch unimportable."""
    import os
    import subprocess
    import sys

    from conftest import without_packages

    data, images = dataset
    code = (
        "import sys, parrot; from parrot.training.config import TrainConfig; from parrot.training import train\n"
        "out = train(TrainConfig(stage=2, model=sys.argv[1], data=sys.argv[2], image_dir=sys.argv[3], "
        "output=sys.argv[4], backend='mlx', lora=True, max_steps=2, batch_size=2, num_workers=0), progress=False)\n"
        "m = parrot.load(sys.argv[1], backend='mlx', adapter=out)\n"
        "print(len(m.adapter.modules), 'torch' in sys.modules)"
    )
    env = {**os.environ, **without_packages("torch")}
    p = subprocess.run([sys.executable, "-c", code, str(tiny_ckpt), str(data), str(images), str(tmp_path / "o")],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[-2:] == ["14", "False"]
    p = run_parrot("train", "--backend", "mlx", "--stage", "2", "--model", tiny_ckpt, "--data", data, "--output",
                   tmp_path / "o2", env=without_packages("mlx"))
    assert_clean_failure(p, "--backend mlx needs MLX")
