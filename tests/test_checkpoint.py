"""Checkpoints are validated before loading; each defect gets a clear error naming what is wrong."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import parrot
from conftest import random_image, requires_mlx, requires_torch
from parrot.errors import ParrotError
from parrot.model.checkpoint import Checkpoint
from parrot.model.config import ParrotConfig
from parrot.storage.safetensors_io import CheckpointFiles, save_tensors
from parrot.testing import write_tiny_checkpoint


def _rewrite(d, edit):
    files = CheckpointFiles(d)
    weights = {k: files.read(k) for k in files.keys()}
    edit(weights)
    for p in d.glob("*.safetensors"):
        p.unlink()
    (d / "model.safetensors.index.json").unlink(missing_ok=True)
    save_tensors(weights, d)


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, d)
    return d


def test_released_extras_are_accepted(ckpt):
    """CLIP's unused last layer and post_layernorm are in the file (as in the release) and accepted."""
    c = Checkpoint.open(ckpt)
    keys = c.files.keys()
    assert any(".encoder.layers.2." in k for k in keys) and any("post_layernorm" in k for k in keys)
    assert not any(".encoder.layers.2." in k for k in c.manifest.required)


def test_missing_key_is_named(ckpt):
    _rewrite(ckpt, lambda w: w.pop("model.moe_model.experts.3.up_proj.weight"))
    with pytest.raises(ParrotError, match=r"missing tensor.*experts\.3\.up_proj"):
        Checkpoint.open(ckpt)


def test_unexpected_key_is_named(ckpt):
    _rewrite(ckpt, lambda w: w.__setitem__("model.layers.0.mlp.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(ParrotError, match=r"unexpected tensor.*mlp\.extra"):
        Checkpoint.open(ckpt)


def test_wrong_shape_is_named(ckpt):
    _rewrite(ckpt, lambda w: w.__setitem__("model.mm_projector.2.weight", np.zeros((64, 63), np.float32)))
    with pytest.raises(ParrotError, match=r"mm_projector\.2\.weight.*shape \(64, 63\).*\(64, 64\)"):
        Checkpoint.open(ckpt)


def test_unresolvable_vision_tower_names_the_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mm_vision_tower"] = "someone/unknown-tower"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ParrotError, match="mm_vision_tower 'someone/unknown-tower' does not resolve"):
        Checkpoint.open(ckpt)
    # an explicit override resolves it
    assert Checkpoint.open(ckpt, vision_tower=ckpt / "clip-vit-tiny").tower.config.image_size == 30


def test_truncated_and_corrupt_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(ParrotError, match="truncated"):
        Checkpoint.open(ckpt)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ParrotError, match="corrupt"):
        Checkpoint.open(ckpt)


def test_wrong_model_type_and_missing_files(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ParrotError, match="model_type is 'llama'"):
        Checkpoint.open(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(ParrotError, match="config.json"):
        Checkpoint.open(ckpt)
    with pytest.raises(ParrotError, match="not found"):
        Checkpoint.open(tmp_path / "nowhere")


@pytest.mark.parametrize("ref", ["relative", "absolute", "builtin"])
def test_vision_tower_resolution(tmp_path, ref):
    d = write_tiny_checkpoint(tmp_path / "c", tower_ref=ref)
    if ref == "builtin":  # the hub id resolves from the built-in table: the released ViT-L/14-336
        cfg = ParrotConfig.from_file(d)
        from parrot.model.tower import resolve_vision_tower

        t = resolve_vision_tower(cfg, d)
        assert (t.config.hidden_size, t.config.num_hidden_layers, t.config.image_size, t.config.patch_size) == (
            1024, 24, 336, 14)
        assert t.config.hidden_act == "quick_gelu" and t.image.crop_height == 336
        return
    assert Checkpoint.open(d).tower.directory.resolve() == (d / "clip-vit-tiny").resolve()


@requires_torch
def test_vision_weights_from_tower_directory(tmp_path):
    """A checkpoint without model.vision_tower.* takes the CLIP weights from the tower directory."""
    full = write_tiny_checkpoint(tmp_path / "full", seed=3)
    split = write_tiny_checkpoint(tmp_path / "split", seed=3, vision_in_checkpoint=False)
    assert not any(k.startswith("model.vision_tower") for k in CheckpointFiles(split).keys())
    a, b = parrot.load(full), parrot.load(split)
    ids = a.encode_prompt("hello", True)
    px = a.preprocess(random_image(12, 12))
    assert np.array_equal(a.logits(ids, px), b.logits(ids, px))
    nothing = write_tiny_checkpoint(tmp_path / "none", vision_in_checkpoint=False, tower_weights=False)
    with pytest.raises(ParrotError, match="no vision tower weights"):
        parrot.load(nothing)


def test_config_round_trip_keeps_every_field(tiny_ckpt):
    raw = json.loads((tiny_ckpt / "config.json").read_text())
    cfg = ParrotConfig.from_dict(raw)
    assert cfg.to_dict() == raw
    assert (cfg.rope_theta, cfg.moe_weight, cfg.num_key_value_heads) == (12345.0, 0.25, 2)


def test_rope_theta_read_from_rope_parameters():
    """transformers 5 nests rope_theta in rope_parameters; it is read there and written explicitly."""
    raw = {"model_type": "parrot_qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "dtype": "bfloat16",
           "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}
    cfg = ParrotConfig.from_dict(raw)
    assert cfg.rope_theta == 1e6 and cfg.torch_dtype == "bfloat16"
    out = cfg.to_dict()
    assert out["rope_theta"] == 1e6 and out["rope_parameters"]["rope_theta"] == 1e6
    assert cfg.llm_dict()["rope_theta"] == 1e6


@requires_mlx
@requires_torch
def test_sharded_checkpoint_loads_on_both_backends(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "sharded", max_shard_bytes=60_000)
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 3
    t, m = parrot.load(d, backend="cpu"), parrot.load(d, backend="mlx")
    ids = t.encode_prompt("hi", True)
    px = t.preprocess(random_image(9, 9))
    assert np.abs(t.logits(ids, px) - m.logits(ids, px)).max() <= 1e-4


def test_index_listing_a_missing_shard(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "sharded", max_shard_bytes=60_000)
    sorted(d.glob("model-*.safetensors"))[1].unlink()
    with pytest.raises(ParrotError, match="listed in model.safetensors.index.json but missing"):
        Checkpoint.open(d)


@requires_torch
def test_bad_inputs_to_logits(tiny_ckpt):
    m = parrot.load(tiny_ckpt)
    ids = m.encode_prompt("hi", True)
    with pytest.raises(ParrotError, match="no image was given"):
        m.logits(ids)
    with pytest.raises(ParrotError, match="more than one image"):
        m.logits(ids + [parrot.IMAGE_TOKEN_INDEX], m.preprocess(random_image(5, 5)))
    with pytest.raises(ParrotError, match="outside the vocabulary"):
        m.logits([1, 2, 10**6])
    with pytest.raises(ParrotError, match="unknown backend"):
        parrot.load(tiny_ckpt, backend="tpu")


@requires_torch
def test_clip_keys_saved_by_transformers_5_are_accepted(tmp_path):
    """transformers 5 drops CLIP's `vision_model.` level when saving; both spellings load alike."""
    ref = write_tiny_checkpoint(tmp_path / "ref", seed=8)
    d = write_tiny_checkpoint(tmp_path / "t5", seed=8)
    strip = lambda k: k.replace("vision_tower.vision_tower.vision_model.", "vision_tower.vision_tower.")  # noqa: E731
    files = CheckpointFiles(d)
    raw = {strip(k): files.read(k) for k in files.keys()}
    tower = CheckpointFiles(d / "clip-vit-tiny")
    tower_raw = {k[len("vision_model."):]: tower.read(k) for k in tower.keys()}
    for p in list(d.glob("*.safetensors")) + list((d / "clip-vit-tiny").glob("*.safetensors")):
        p.unlink()
    save_tensors(raw, d)
    save_tensors(tower_raw, d / "clip-vit-tiny")
    import safetensors

    with safetensors.safe_open(d / "model.safetensors", "np") as f:
        assert "model.vision_tower.vision_tower.embeddings.class_embedding" in f.keys()
    a, b = parrot.load(ref), parrot.load(d)
    ids = a.encode_prompt("hi", True)
    px = a.preprocess(random_image(12, 16))
    assert np.array_equal(a.logits(ids, px), b.logits(ids, px))
    # a tower directory in the transformers 5 spelling supplies the weights too
    (d / "model.safetensors").unlink()
    save_tensors({k: v for k, v in raw.items() if not k.startswith("model.vision_tower")}, d)
    assert np.array_equal(a.logits(ids, px), parrot.load(d).logits(ids, px))
