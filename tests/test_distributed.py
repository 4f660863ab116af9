"""Sharded training on CPU (gloo, 2 processes, tiny model): DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2 follow
the single-process loop step for step, resume after a kill, reshard 2 -> 1, and their native
checkpoints convert to the official layout exactly as DeepSpeed / torch consolidate them.

One run per strategy is shared by the assertions (9 samples, global batch 4 = 2 processes x 2, 6 steps,
so steps 3 and 6 are partial: rank 1 then runs a filler micro-batch; in step 1 rank 1 trains on
text-only samples only). The first DeepSpeed process JIT-builds its CPU comm op (~1 min, cached).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from dist_helpers import (
    MAX_STEPS,
    launch,
    launch_and_kill,
    plan,
    train_args,
    write_mixed_data,
)
from train_helpers import read_losses

from conftest import requires_mlx, requires_torch, run_parrot
from parrot.storage.safetensors_io import CheckpointFiles

pytestmark = [requires_torch, pytest.mark.slow]  # every test here launches torchrun / DeepSpeed
requires_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                        reason="DeepSpeed is not installed (pip install 'parrot-vlm[deepspeed]')")
ZERO2, ZERO3 = (pytest.param(z, marks=requires_deepspeed) for z in ("zero2", "zero3"))

TOL = 1e-5  # fp32: the ranks' gradients are summed in another order than one process sums micro-batches
LAST = f"step-{MAX_STEPS:08d}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_mixed_data(tmp_path_factory.mktemp("dist-data"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt, data):
    """Lazily started runs, by name, each once per module: "single" (the reference loop, one process,
    batch 2 x 2 accumulation) and 2-process runs (batch 2, no accumulation) under each strategy."""
    root = tmp_path_factory.mktemp("dist-runs")
    done: dict[str, object] = {}
    how = {
        "single": (1, "none", ()),
        "zero3": (2, "torchrun", ("--deepspeed", "zero3")),  # the built-in config, by name
        "zero2": (2, "deepspeed", ("--deepspeed", "configs/zero2.json")),  # the deepspeed launcher
        "fsdp": (2, "torchrun", ("--fsdp",)),
    }

    def get(name: str):
        if name not in done:
            nproc, launcher, extra = how[name]
            out = root / name
            extra = tuple(str(_repo() / e) if e.endswith(".json") else e for e in extra)
            log = launch(train_args(tiny_ckpt, *data, out, 2 // nproc, *extra), nproc, launcher)
            done[name] = (out, log)
        return done[name]

    return get


def _repo() -> Path:
    return Path(__file__).resolve().parent.parent


def _weights(directory) -> dict[str, np.ndarray]:
    f = CheckpointFiles(directory)
    return {k: f.read(k) for k in f.keys()}


def _close_weights(a: dict, b: dict) -> None:
    """Adam divides by sqrt(v): an entry whose gradient is ~0 may move on rounding; the bulk agrees tightly."""
    assert a.keys() == b.keys()
    diff = np.concatenate([np.abs(a[k] - b[k]).ravel() for k in a])
    assert diff.max() < 1e-3 and np.mean(diff < 1e-6) > 0.99, (diff.max(), np.mean(diff < 1e-6))


def _copy_run_until(src, dst, step: int) -> None:
    """The run directory as a job killed right after checkpoint `step` would leave it."""
    dst.mkdir()
    for name in ("run_config.json", "metrics.jsonl", "data_report.json"):
        shutil.copy(src / name, dst / name)
    shutil.copytree(src / "checkpoints" / f"step-{step:08d}", dst / "checkpoints" / f"step-{step:08d}")


# ---------------------------------------------------------------- losses
@pytest.mark.parametrize("strategy", [ZERO2, ZERO3, "fsdp"])
def test_sharded_runs_give_the_single_process_losses(runs, strategy):
    ref_dir, _ = runs("single")
    out, log = runs(strategy)
    ref, got = read_losses(ref_dir), read_losses(out)
    assert len(ref) == MAX_STEPS and len(set(np.round(ref, 3))) == MAX_STEPS  # the model does learn
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)
    assert "2 process(es)" in log and ("FSDP2" in log if strategy == "fsdp" else f"ZeRO-{strategy[-1]}" in log)
    _close_weights(_weights(out), _weights(ref_dir))  # the exported models (rank 0 gathered the shards)


def test_a_rank_with_only_text_samples_does_not_hang(runs, data):
    """Step 1: rank 1's micro-batch is text-only, rank 0's has images; steps 3 and 6 leave rank 1 only a
    filler. Under ZeRO-3 and FSDP every rank must still gather the vision tower, projector and MoE: the
    runs finish (launch() fails a run still going after its timeout) and log every step."""
    from parrot.backends.torch_cuda.train.data import rank_micro_batches

    samples = json.loads(data[0].read_text())
    p = plan()
    (rank1,) = p.micro_batches(0, rank=1)
    (rank0,) = p.micro_batches(0, rank=0)
    assert all("image" not in samples[i] for i in rank1) and any("image" in samples[i] for i in rank0)
    assert [f for _, f in rank_micro_batches(p, 2, 1, 2)] == [True]  # a filler
    for strategy in ("zero3", "fsdp") if importlib.util.find_spec("deepspeed") else ("fsdp",):
        out, _ = runs(strategy)
        assert len(read_losses(out)) == MAX_STEPS


def test_one_process_with_accumulation_equals_two_processes_without(runs, tiny_ckpt, data, tmp_path):
    two, _ = runs("fsdp")
    one = tmp_path / "fsdp-1"
    log = launch(train_args(tiny_ckpt, *data, one, 2, "--fsdp"), 1, "none")  # not launched: a group of one
    assert "2 x 2 accumulation x 1 process(es), FSDP2" in log
    np.testing.assert_allclose(read_losses(one), read_losses(two), rtol=0, atol=TOL)


# ---------------------------------------------------------------- resume
def test_fsdp_run_killed_then_resumed_in_one_process(runs, tiny_ckpt, data, tmp_path):
    """Killed after checkpoint 2 (2 processes), resumed by 1 process with 2 x accumulation: DCP reshards."""
    full, _ = runs("fsdp")
    out = tmp_path / "killed"
    launch_and_kill(train_args(tiny_ckpt, *data, out, 1, "--fsdp"), 2, out, after_step=2)
    assert not (out / "config.json").exists()
    log = launch(train_args(tiny_ckpt, *data, out, 2, "--fsdp", "--resume"), 1, "none")
    assert "resumed from" in log
    np.testing.assert_allclose(read_losses(out), read_losses(full), rtol=0, atol=TOL)
    _close_weights(_weights(out), _weights(full))


@requires_deepspeed
def test_deepspeed_run_killed_then_resumed_reproduces_the_losses(runs, tiny_ckpt, data, tmp_path):
    full, _ = runs("zero3")
    out = tmp_path / "killed"
    ds = ("--deepspeed", str(_repo() / "configs" / "zero3.json"))
    launch_and_kill(train_args(tiny_ckpt, *data, out, 1, *ds), 2, out, after_step=2)
    assert not (out / "config.json").exists()
    log = launch(train_args(tiny_ckpt, *data, out, 1, *ds, "--resume"), 2)
    assert "resumed from" in log
    np.testing.assert_allclose(read_losses(out), read_losses(full), rtol=0, atol=1e-7)  # same world: same sums
    a, b = _weights(out), _weights(full)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", [ZERO2, ZERO3])
def test_deepspeed_checkpoint_of_two_processes_resumes_in_one(runs, tiny_ckpt, data, tmp_path, strategy):
    """Master weights and Adam moments consolidated from the 2-rank ZeRO files, set into 1 rank's."""
    full, _ = runs(strategy)
    out = tmp_path / "one"
    _copy_run_until(full, out, step=2)
    cfg = str(_repo() / "configs" / f"{strategy}.json")
    log = launch(train_args(tiny_ckpt, *data, out, 2, "--deepspeed", cfg, "--resume"), 1, "none")
    assert "saved by 2 processes, loading into 1" in log
    np.testing.assert_allclose(read_losses(out), read_losses(full), rtol=0, atol=TOL)
    _close_weights(_weights(out), _weights(full))


# ---------------------------------------------------------------- parrot convert
def _logits_match(a_dir, b_dir, image) -> None:
    import parrot

    a, b = parrot.load(a_dir, backend="cpu"), parrot.load(b_dir, backend="cpu")
    ids = a.encode_prompt("Describe the image in detail.", has_image=True)
    x, y = a.logits(ids, a.preprocess(image)), b.logits(ids, b.preprocess(image))
    assert np.isfinite(x).all() and np.abs(x - y).max() <= 1e-6


@pytest.mark.parametrize("strategy", [ZERO2, ZERO3])
def test_convert_of_a_deepspeed_checkpoint_equals_zero_to_fp32(runs, data, tmp_path, strategy):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out, _ = runs(strategy)
    ckpt = out / "checkpoints" / LAST
    p = run_parrot("convert", ckpt, tmp_path / "hf", "--to", "hf")
    assert p.returncode == 0, p.stderr
    ref = {k: v.detach().float().numpy() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt)).items()}
    got = _weights(tmp_path / "hf")
    assert set(ref) <= set(got) and set(got) - set(ref) == {k for k in _weights(out) if k not in ref}  # + CLIP's
    for k in ref:  # unused last layer, from the tower directory, as the export carries it
        assert np.array_equal(got[k], ref[k]), k
    _logits_match(tmp_path / "hf", out, data[1] / "0.png")  # the final checkpoint is the exported model


def test_convert_of_a_dcp_checkpoint_equals_torch_consolidation(runs, data, tmp_path):
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out, _ = runs("fsdp")
    ckpt = out / "checkpoints" / LAST
    dcp_to_torch_save(ckpt, tmp_path / "full.pt")
    ref = torch.load(tmp_path / "full.pt", weights_only=False)["model"]  # torch's own output, written just now
    p = run_parrot("convert", ckpt, tmp_path / "hf", "--to", "hf")
    assert p.returncode == 0, p.stderr
    got = _weights(tmp_path / "hf")
    assert set(ref) <= set(got)
    for k, v in ref.items():
        assert np.array_equal(got[k], v.numpy()), k
    _logits_match(tmp_path / "hf", out, data[1] / "0.png")


def test_convert_needs_the_model_description(runs, tiny_ckpt, tmp_path):
    out, _ = runs("fsdp")
    bare = tmp_path / "bare"
    shutil.copytree(out / "checkpoints" / LAST, bare)
    shutil.rmtree(bare / "model")
    p = run_parrot("convert", bare, tmp_path / "x", "--to", "hf")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "model description" in p.stderr and "--config DIR" in p.stderr
    p = run_parrot("convert", bare, tmp_path / "y", "--to", "hf", "--config", tiny_ckpt)
    assert p.returncode == 0, p.stderr
    got, want = _weights(tmp_path / "y"), _weights(out)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)


@requires_deepspeed
@requires_mlx
def test_a_deepspeed_checkpoint_converts_to_mlx(runs, tmp_path):
    import parrot

    out, _ = runs("zero3")
    p = run_parrot("convert", out / "checkpoints" / LAST, tmp_path / "mlx", "--to", "mlx")
    assert p.returncode == 0, p.stderr
    m, t = parrot.load(tmp_path / "mlx", backend="mlx"), parrot.load(out, backend="cpu")
    ids = t.encode_prompt("What is in the picture?", has_image=False)
    assert np.abs(m.logits(ids) - t.logits(ids)).max() <= 1e-4
