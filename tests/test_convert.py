"""`parrot convert` (float): official -> MLX -> official is bit-exact, the MLX output is
self-contained and computes the torch backend's logits, dtype defaults, vision tower merging,
hub sources."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import random_image, requires_mlx, requires_torch, run_parrot
from parrot.convert import convert_checkpoint
from parrot.model.config import VisionConfig
from parrot.storage.safetensors_io import INDEX_NAME, CheckpointFiles
from parrot.testing import TinySpec, write_tiny_checkpoint

PATCH = "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"


def raw_tensors(directory: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """key -> (safetensors dtype, shape, raw bytes), read straight from the files."""
    files = CheckpointFiles(directory)
    out = {}
    for k in files.keys():
        info = files.info(k)
        with open(files.files[files.location[k]].path, "rb") as f:
            f.seek(info.start)
            out[k] = (info.dtype, info.shape, f.read(info.nbytes))
    return out


def prompt_and_pixels(model, seed: int = 0):
    ids = model.encode_prompt("What is in the picture? 图片里有什么？", has_image=True)
    return ids, model.preprocess(random_image(37, 23, seed))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_official_to_mlx_to_official_is_bit_exact(tmp_path, dtype):
    src = write_tiny_checkpoint(tmp_path / "src", TinySpec(), seed=4, dtype=dtype, max_shard_bytes=200_000)
    convert_checkpoint(src, tmp_path / "mlx", to="mlx", max_shard_bytes=300_000)
    proc = run_parrot("convert", tmp_path / "mlx", tmp_path / "back", "--to", "hf")
    assert proc.returncode == 0, proc.stderr

    before, after = raw_tensors(src), raw_tensors(tmp_path / "back")
    assert set(after) == set(before)
    assert any(".encoder.layers.2." in k for k in before)  # CLIP's unused last layer is carried too
    for k, (dt, shape, data) in before.items():
        assert after[k] == (dt, shape, data), k
    # the MLX layout in between: channels-last patch embedding, every other tensor unchanged
    mlx = CheckpointFiles(tmp_path / "mlx")
    src_files = CheckpointFiles(src)
    patch = mlx.read("vision_tower.vision_model.embeddings.patch_embedding.weight")
    np.testing.assert_array_equal(patch, src_files.read(PATCH).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(mlx.read("language_model.lm_head.weight"), src_files.read("lm_head.weight"))
    assert (tmp_path / "mlx" / INDEX_NAME).is_file()  # several shards with an index
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["torch_dtype"] == dtype and "quantization" not in config


@requires_mlx
@requires_torch
def test_mlx_output_is_self_contained_and_matches_torch(tmp_path):
    import parrot

    src = write_tiny_checkpoint(tmp_path / "src", TinySpec(), seed=7)
    convert_checkpoint(src, tmp_path / "mlx")
    moved = tmp_path / "elsewhere"
    shutil.move(str(src), moved)  # the source (and its relative CLIP directory) is gone

    out = tmp_path / "mlx"
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["hidden_size"] == TinySpec().vision.hidden_size
    assert config["rope_theta"] == TinySpec().rope_theta
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (out / name).is_file(), name
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())

    mlx_model = parrot.load(out, backend="mlx")
    torch_model = parrot.load(moved, backend="cpu")
    for seed in range(2):
        ids, pixels = prompt_and_pixels(mlx_model, seed)
        np.testing.assert_array_equal(pixels, torch_model.preprocess(random_image(37, 23, seed)))
        a, b = mlx_model.logits(ids, pixels), torch_model.logits(ids, pixels)
        assert np.abs(a - b).max() <= 1e-4
        assert np.abs(b).max() > 1.0  # logits are O(1): the comparison means something


def test_dtype_defaults_to_stored_dtype_and_casts_when_asked(tmp_path):
    src = write_tiny_checkpoint(tmp_path / "src", TinySpec(), seed=1, dtype="bfloat16")
    cfg = json.loads((src / "config.json").read_text())
    cfg["torch_dtype"] = "float32"  # a config claiming fp32 must not make us upcast or downcast
    (src / "config.json").write_text(json.dumps(cfg))
    convert_checkpoint(src, tmp_path / "keep")
    kept = CheckpointFiles(tmp_path / "keep")
    assert {kept.info(k).dtype for k in kept.keys()} == {"BF16"}
    assert json.loads((tmp_path / "keep" / "config.json").read_text())["torch_dtype"] == "bfloat16"

    convert_checkpoint(src, tmp_path / "f32", dtype="float32")
    up = CheckpointFiles(tmp_path / "f32")
    assert {up.info(k).dtype for k in up.keys()} == {"F32"}
    w = "language_model.model.layers.0.mlp.up_proj.weight"
    np.testing.assert_array_equal(up.read(w), kept.read(w).astype(np.float32))


def test_float16_overflow_is_reported(tmp_path):
    src = write_tiny_checkpoint(tmp_path / "src", TinySpec(), seed=1)
    files = CheckpointFiles(src)
    tensors = {k: files.read(k) for k in files.keys()}
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1e6
    for p in src.glob("*.safetensors"):
        p.unlink()
    from parrot.storage.safetensors_io import save_tensors

    save_tensors(tensors, src)
    with pytest.warns(UserWarning, match="model.norm.weight: values overflow float16"):
        result = convert_checkpoint(src, tmp_path / "f16", dtype="float16")
    assert any("overflow" in w for w in result.warnings)


@requires_mlx
@requires_torch
def test_vision_tower_directory_is_merged_when_checkpoint_lacks_it(tmp_path):
    import parrot

    src = write_tiny_checkpoint(tmp_path / "src", TinySpec(), seed=3, vision_in_checkpoint=False)
    tower = tmp_path / "clip-tiny"
    shutil.move(str(src / "clip-vit-tiny"), tower)
    proc = run_parrot("convert", src, tmp_path / "mlx")
    assert proc.returncode == 1 and "--vision-tower" in proc.stderr
    proc = run_parrot("convert", src, tmp_path / "mlx", "--vision-tower", tower)
    assert proc.returncode == 0, proc.stderr

    out = CheckpointFiles(tmp_path / "mlx")
    tower_files = CheckpointFiles(tower)
    for k in tower_files.keys():  # every CLIP tensor, the unused last layer and post_layernorm included
        got = out.read("vision_tower." + k)
        want = tower_files.read(k)
        np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1) if got.ndim == 4 else want)
    torch_model = parrot.load(src, backend="cpu", vision_tower=tower)
    shutil.rmtree(tower)
    mlx_model = parrot.load(tmp_path / "mlx", backend="mlx")
    ids, pixels = prompt_and_pixels(mlx_model)
    assert np.abs(mlx_model.logits(ids, pixels) - torch_model.logits(ids, pixels)).max() <= 1e-4


def test_vision_tower_supplies_the_config_when_mm_vision_tower_does_not_resolve(tmp_path):
    src = write_tiny_checkpoint(tmp_path / "src", TinySpec(), seed=3)
    tower = tmp_path / "clip-tiny"
    shutil.move(str(src / "clip-vit-tiny"), tower)  # mm_vision_tower ("clip-vit-tiny") now dangles
    proc = run_parrot("convert", src, tmp_path / "mlx")
    assert proc.returncode == 1 and "mm_vision_tower" in proc.stderr and not (tmp_path / "mlx").exists()
    proc = run_parrot("convert", src, tmp_path / "mlx", "--vision-tower", tower)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert VisionConfig.from_dict(config["vision_config"]) == TinySpec().vision
    assert config["mm_vision_tower"] == str(tower.resolve())


def test_hub_id_source_offline_fails_clearly(tmp_path):
    proc = run_parrot("convert", "AIDC-AI/Parrot-7B", tmp_path / "out",
                      env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "AIDC-AI/Parrot-7B" in proc.stderr and "offline" in proc.stderr.lower()
    assert not (tmp_path / "out").exists()


def test_hub_id_source_and_tower_are_downloaded_when_online(tmp_path, monkeypatch):
    import huggingface_hub

    from parrot.cli.main import main

    src = write_tiny_checkpoint(tmp_path / "snapshot", TinySpec(), seed=5, vision_in_checkpoint=False,
                                tower_ref="builtin")
    tower = tmp_path / "tower-snapshot"
    shutil.move(str(src / "clip-vit-tiny"), tower)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, tuple(allow_patterns or ())))
        return str({"AIDC-AI/Parrot-tiny": src, "someone/clip-tiny": tower}[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    main(["convert", "AIDC-AI/Parrot-tiny", str(tmp_path / "out"), "--vision-tower", "someone/clip-tiny"])
    assert [c[0] for c in calls] == ["AIDC-AI/Parrot-tiny", "someone/clip-tiny"]
    assert "*.safetensors" in calls[1][1]
    out = CheckpointFiles(tmp_path / "out")
    assert "vision_tower.vision_model.pre_layrnorm.weight" in out.keys()


def test_cli_progress_bar_and_summary(tmp_path, tiny_ckpt):
    proc = run_parrot("convert", tiny_ckpt, tmp_path / "mlx")
    assert proc.returncode == 0, proc.stderr
    assert "converting" in proc.stderr and "B/s" in proc.stderr  # tqdm bar in bytes with a rate
    assert f"Wrote {tmp_path / 'mlx'}" in proc.stdout
