"""A short `parrot train` run (torch with the machine's default backend, and MLX): its one-process checkpoints
convert into the model the trainer exports, its files get the umask's permissions, and bad --image-dir values
fail before anything runs."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from train_helpers import write_dataset

from conftest import assert_clean_failure, requires_mlx, requires_torch, run_parrot
from parrot.errors import ParrotError
from parrot.model.layout import mlx_to_official_key
from parrot.storage.safetensors_io import CheckpointFiles, SafetensorsFile

STEPS = ("step-00000001", "step-00000002")


@pytest.fixture(scope="module", params=[pytest.param("default", marks=requires_torch),
                                        pytest.param("mlx", marks=requires_mlx)])
def run(request, tmp_path_factory, tiny_ckpt):
    """Two steps with a checkpoint after each, under umask 027; torch without --backend (the default)."""
    root = tmp_path_factory.mktemp(f"run-{request.param}")
    data, images = write_dataset(root / "d", n=4)
    backend = [] if request.param == "default" else ["--backend", "mlx"]
    old = os.umask(0o027)
    try:
        proc = run_parrot("train", *backend, "--stage", "2", "--model", tiny_ckpt, "--data", data, "--image-dir",
                          images, "--output", root / "run", "--iters", "2", "--save-every", "1", "--batch-size", "2",
                          "--grad-accum", "1", "--learning-rate", "1e-2", "--warmup-ratio", "0", "--num-workers", "0")
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return request.param, root / "run"


def test_train_defaults_to_the_machines_backend(run):
    from parrot.registry import default_backend

    kind, out = run
    cfg = json.loads((out / "run_config.json").read_text())["config"]
    assert cfg["backend"] == (default_backend() if kind == "default" else "mlx")
    assert cfg["max_steps"] == 2 and cfg["lr"] == 1e-2  # --iters and --learning-rate, mlx-lm's names


def test_training_outputs_get_the_umask_permissions(run):
    out = run[1]
    got = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    want = {k: 0o750 if (out / k).is_dir() else 0o640 for k in got}
    assert got == want
    assert {"run_config.json", "metrics.jsonl", "config.json", "checkpoints/step-00000001/trainer_state.json",
            "checkpoints/step-00000001/optimizer.json", "checkpoints/step-00000001/model/config.json"} <= set(got)


def test_checkpoints_convert_to_the_trained_model(run, tiny_ckpt, tmp_path):
    from parrot.convert import convert_checkpoint

    kind, out = run
    base, final = CheckpointFiles(tiny_ckpt), CheckpointFiles(out)
    for step in STEPS:
        convert_checkpoint(out / "checkpoints" / step, tmp_path / step, to="hf")
    last = CheckpointFiles(tmp_path / STEPS[1])
    assert sorted(last.keys()) == sorted(final.keys())
    for k in final.keys():  # the last checkpoint converts into exactly what the trainer exported
        assert np.array_equal(last.read(k), final.read(k)), k
    first = CheckpointFiles(tmp_path / STEPS[0])
    sf = SafetensorsFile(out / "checkpoints" / STEPS[0] / "model.safetensors")
    name = (lambda k: mlx_to_official_key(k)) if kind == "mlx" else (lambda k: k)
    trained = {name(k): sf.read(k) for k in sf.keys()}  # stage 2: all but the vision tower
    assert {k for k in first.keys() if k not in trained} == {k for k in base.keys() if k.startswith("model.vision")}
    for k in first.keys():  # trained tensors from the checkpoint, frozen ones from the source model, in the run's dtype
        got = first.read(k)  # (bfloat16 on cuda: the float32 master weights rounded, as the export does)
        assert np.array_equal(got, (trained[k] if k in trained else base.read(k)).astype(got.dtype)), k
    assert sum(not np.array_equal(trained[k], base.read(k)) for k in trained) > 10  # step 1 moved them (lr 1e-2)
    assert json.loads((tmp_path / STEPS[0] / "config.json").read_text())["use_moe"] is True


def test_missing_image_dir_is_refused_before_anything_runs(tiny_ckpt, tmp_path):
    data, images = write_dataset(tmp_path / "d", n=2)
    proc = run_parrot("train", "--backend", "cpu", "--stage", "2", "--model", tiny_ckpt, "--data", data,
                      "--image-dir", tmp_path / "imgaes", "--output", tmp_path / "out", "--num-workers", "0")
    assert_clean_failure(proc, "--image-dir", "imgaes", "not found")
    assert not (tmp_path / "out").exists()


def test_a_dataset_whose_images_all_fail_to_load_is_an_error(tiny_ckpt, tmp_path):
    from parrot.model.image import ImageSettings
    from parrot.model.tokenizer import Tokenizer
    from parrot.training.data import LlavaData

    data, images = write_dataset(tmp_path / "d", n=6)  # 4 image samples, 2 text-only
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    tok = Tokenizer.from_dir(tiny_ckpt)
    with pytest.raises(ParrotError, match=r"none of the 4 image samples has a usable image .*image not found"):
        LlavaData(data, empty, tok, ImageSettings(), 10)
    for name in os.listdir(images):  # one image left: the run trains on it and the text samples
        if name != "img0.png":
            (images / name).unlink()
    kept = LlavaData(data, images, tok, ImageSettings(), 10)
    assert sum(s.image is not None for s in kept.samples) >= 1 and kept.report.num_dropped > 0
