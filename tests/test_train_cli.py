"""`parrot train` end to end (subprocesses): stage 1 from a plain LLM + CLIP, stage 2 from its output,
a killed run resumed exactly, the export converted to MLX, and clean errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from train_helpers import read_losses, write_dataset

from conftest import assert_clean_failure, requires_mlx, requires_torch, run_parrot, run_parrot_here
from parrot.storage.safetensors_io import CheckpointFiles
from parrot.testing import write_tiny_clip, write_tiny_llm

pytestmark = requires_torch

CPU = ("--backend", "cpu", "--num-workers", "0")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n=6)


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory, dataset):
    """Stage 1 from --llm + --vision-tower, then stage 2 from stage 1's output."""
    root = tmp_path_factory.mktemp("cli")
    llm, clip = write_tiny_llm(root / "qwen2-tiny", seed=1), write_tiny_clip(root / "clip-tiny", seed=2)
    data, images = dataset
    s1 = run_parrot("train", *CPU, "--stage", "1", "--llm", llm, "--vision-tower", clip, "--data", data,
                    "--image-dir", images, "--output", root / "s1", "--max-steps", "3", "--batch-size", "2",
                    "--grad-accum", "1", "--moe-intermediate-size", "32")
    assert s1.returncode == 0, s1.stdout + s1.stderr
    s2 = run_parrot("train", *CPU, "--stage", "2", "--model", root / "s1", "--data", data, "--image-dir", images,
                    "--output", root / "s2", "--epochs", "2", "--batch-size", "2", "--grad-accum", "2")
    assert s2.returncode == 0, s2.stdout + s2.stderr
    return root, llm, clip, s1, s2


def test_stage1_from_llm_then_stage2_from_its_output(two_stages, dataset):
    import parrot

    root, llm, clip, s1, s2 = two_stages
    assert "trainable parameters: 7,296 of" in s1.stdout  # projector: 48*64+64 + 64*64+64
    assert "LLM" in s2.stdout.split("trainable parameters")[1].splitlines()[0]
    assert len(read_losses(root / "s1")) == 3
    assert len(read_losses(root / "s2")) == 4  # 6 samples / (2 x 2) = 2 steps per epoch (the 2nd partial) x 2
    rows = [json.loads(x) for x in (root / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "padding_fraction"} <= rows[0].keys()
    cfg1 = json.loads((root / "s1" / "config.json").read_text())
    cfg2 = json.loads((root / "s2" / "config.json").read_text())
    assert cfg1["use_moe"] is False and cfg2["use_moe"] is True and cfg2["moe_intermediate_size"] == 32
    w_llm, w_clip, w1 = CheckpointFiles(llm), CheckpointFiles(clip), CheckpointFiles(root / "s1")
    for k in w_llm.keys():  # stage 1 leaves the LLM as it was
        assert np.array_equal(w1.read(k), w_llm.read(k)), k
    for k in w_clip.keys():
        assert np.array_equal(w1.read("model.vision_tower.vision_tower." + k), w_clip.read(k)), k
    m = parrot.load(root / "s2", backend="cpu")
    ids = m.encode_prompt("What is in the picture?", has_image=True)
    logits = m.logits(ids, m.preprocess(dataset[1] / "img0.png"))
    assert logits.shape == (len(ids) - 1 + m.num_visual_tokens, m.config.vocab_size) and np.isfinite(logits).all()


@requires_mlx
def test_exported_checkpoint_converts_to_mlx_with_matching_logits(two_stages, dataset, tmp_path):
    import parrot
    from parrot.convert.core import convert_checkpoint

    root = two_stages[0]
    convert_checkpoint(root / "s2", tmp_path / "mlx", to="mlx")
    t, m = parrot.load(root / "s2", backend="cpu"), parrot.load(tmp_path / "mlx", backend="mlx")
    image = dataset[1] / "img1.png"
    ids = t.encode_prompt("Describe the image in detail.", has_image=True)
    a, b = t.logits(ids, t.preprocess(image)), m.logits(ids, m.preprocess(image))
    assert np.abs(a - b).max() <= 1e-4
    trained = CheckpointFiles(root / "s2" / "checkpoints" / "step-00000004")  # stage 2's last trainer checkpoint
    final = CheckpointFiles(root / "s2")
    key = "model.moe_model.experts.0.up_proj.weight"
    assert np.array_equal(trained.read(key), final.read(key))  # the export holds the trained weights


def test_stage1_checkpoint_of_a_new_model_converts_without_the_untrained_moe(two_stages, tmp_path):
    """Stage 1 from --llm saves only the projector; the MoE (random, bypassed) is in neither the checkpoint nor
    the source: the converted model has no MoE weights, everything else equals the run's export."""
    import parrot
    from parrot.convert.core import convert_checkpoint

    root = two_stages[0]
    with pytest.warns(UserWarning, match="no MoE weights"):
        convert_checkpoint(root / "s1" / "checkpoints" / "step-00000003", tmp_path / "s1", to="hf")
    got, final = CheckpointFiles(tmp_path / "s1"), CheckpointFiles(root / "s1")
    assert set(got.keys()) == {k for k in final.keys() if not k.startswith("model.moe_model.")}
    for k in got.keys():
        assert np.array_equal(got.read(k), final.read(k)), k
    cfg = json.loads((tmp_path / "s1" / "config.json").read_text())
    assert "moe_hidden_size" not in cfg and cfg["use_moe"] is False
    a, b = parrot.load(tmp_path / "s1", backend="cpu"), parrot.load(root / "s1", backend="cpu")
    ids = a.encode_prompt("What is in the picture?", has_image=False)
    assert np.array_equal(a.logits(ids), b.logits(ids))  # stage 1 bypasses the MoE: the same function


@pytest.mark.slow  # a real SIGKILL / browser end to end: make test runs it, make test-quick skips it
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_ckpt, dataset):
    from parrot.training import train
    from parrot.training.config import TrainConfig

    data, images = dataset
    settings = dict(stage=2, model=tiny_ckpt, data=data, image_dir=images, max_steps=24, save_every=3, batch_size=1,
                    grad_accum=2, lr=1e-3, backend="cpu", num_workers=0)
    ref = train(TrainConfig(**{k: v if isinstance(v, int | float) else str(v) for k, v in settings.items()},
                            output=str(tmp_path / "ref")), progress=False)
    out = tmp_path / "killed"
    args = ["train", *(a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))), "--output", out]
    proc = subprocess.Popen([sys.executable, "-m", "parrot.cli.main", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-00000006" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # a real kill: whatever it was writing stays half-written
    proc.wait()
    assert not (out / "config.json").exists()
    again = run_parrot(*args, "--resume")
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout
    assert read_losses(out) == read_losses(ref)
    a, b = CheckpointFiles(ref), CheckpointFiles(out)
    for k in a.keys():
        assert np.array_equal(a.read(k), b.read(k)), k


def test_resume_with_other_settings_is_refused(two_stages, dataset):
    root = two_stages[0]
    data, images = dataset
    p = run_parrot("train", *CPU, "--stage", "2", "--model", root / "s1", "--data", data, "--image-dir", images,
                   "--output", root / "s2", "--epochs", "2", "--batch-size", "1", "--grad-accum", "2", "--resume")
    assert_clean_failure(p, "--resume", "batch_size 2 -> 1")


def test_bad_inputs_fail_cleanly(tmp_path, tiny_ckpt, dataset):
    data, images = dataset
    base = ["train", *CPU, "--stage", "2", "--data", data, "--image-dir", images]
    (tmp_path / "bad.json").write_text('[{"id": 1,')
    cases = [
        ([*base[:-4], "--data", tmp_path / "bad.json", "--model", tiny_ckpt, "--output", tmp_path / "a"],
         ("bad.json", "not valid JSON")),
        ([*base, "--llm", tiny_ckpt, "--output", tmp_path / "b"], ("--llm needs --vision-tower",)),
        ([*base, "--llm", tiny_ckpt, "--vision-tower", tiny_ckpt / "clip-vit-tiny", "--output", tmp_path / "c"],
         ("model_type is 'parrot_qwen2'", "qwen2")),
        ([*base, "--output", tmp_path / "d"], ("--model DIR", "--llm DIR")),
        ([*base, "--llm", write_tiny_llm(tmp_path / "qwen"), "--vision-tower", "openai/clip-vit-large-patch14-336",
          "--output", tmp_path / "g"], ("openai/clip-vit-large-patch14-336", "download")),
        ([*base, "--model", tmp_path / "nope", "--output", tmp_path / "e"], ("nope", "not found")),
        ([*base, "--model", tiny_ckpt, "--output", tiny_ckpt], ("--output", "is the --model")),
        (["train", "--backend", "cuda", "--stage", "2", "--model", tiny_ckpt, "--data", data, "--output",
          tmp_path / "f"], ("--backend cuda",)),
    ]
    for args, needles in cases:
        if "--backend" in args and args[args.index("--backend") + 1] == "cuda":
            import torch

            if torch.cuda.is_available():
                continue
        assert_clean_failure(run_parrot_here(*args), *needles)
