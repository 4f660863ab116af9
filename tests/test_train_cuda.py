"""Training on a CUDA GPU (scripts/gpu_check.sh runs these; skipped where torch sees no GPU): the
bf16 autocast loop, FSDP2 (bf16 mixed precision) and DeepSpeed ZeRO-3 (bf16) in one process, each
against the float32 CPU loop's first-step loss, with their checkpoints converted and compared to the
exported model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from train_helpers import read_losses, write_dataset

from conftest import run_parrot
from parrot.storage.safetensors_io import CheckpointFiles

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
ZERO3 = Path(__file__).resolve().parent.parent / "configs" / "zero3.json"
STEPS = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n=8)


def _train(tiny_ckpt, dataset, out, backend, *extra):
    data, images = dataset
    p = run_parrot("train", "--backend", backend, "--stage", "2", "--model", tiny_ckpt, "--data", data,
                   "--image-dir", images, "--output", out, "--num-workers", "0", "--max-steps", str(STEPS),
                   "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", *extra, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def cpu_losses(tmp_path_factory, tiny_ckpt, dataset):
    return read_losses(_train(tiny_ckpt, dataset, tmp_path_factory.mktemp("cpu") / "run", "cpu"))


def _check_run(out: Path, cpu_losses: list[float]) -> None:
    losses = read_losses(out)
    assert len(losses) == STEPS and np.isfinite(losses).all()
    assert abs(losses[0] - cpu_losses[0]) <= 3e-2 * abs(cpu_losses[0]), (losses[0], cpu_losses[0])  # bf16
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["peak_memory_gib"] > 0 for r in rows)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"


def _convert_matches_export(out: Path, tmp_path: Path) -> None:
    """The last checkpoint, consolidated by parrot convert (float32 masters), is the export once cast."""
    import ml_dtypes

    ckpt = out / "checkpoints" / f"step-{STEPS:08d}"
    p = run_parrot("convert", ckpt, tmp_path / "hf", "--to", "hf", "--dtype", "bfloat16")
    assert p.returncode == 0, p.stderr
    a, b = CheckpointFiles(tmp_path / "hf"), CheckpointFiles(out)
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        x, y = a.read(k), b.read(k)
        assert x.dtype == y.dtype == ml_dtypes.bfloat16 and np.array_equal(x, y), k


def test_bf16_autocast_loop_on_cuda(tmp_path, tiny_ckpt, dataset, cpu_losses):
    import parrot

    out = _train(tiny_ckpt, dataset, tmp_path / "run", "cuda")
    _check_run(out, cpu_losses)
    m = parrot.load(out, backend="cuda")
    logits = m.logits(m.encode_prompt("What is in the picture?", has_image=False))
    assert np.isfinite(logits).all()


def test_fsdp2_on_one_gpu(tmp_path, tiny_ckpt, dataset, cpu_losses):
    out = _train(tiny_ckpt, dataset, tmp_path / "run", "cuda", "--fsdp")
    _check_run(out, cpu_losses)
    assert (out / "checkpoints" / f"step-{STEPS:08d}" / ".metadata").is_file()
    _convert_matches_export(out, tmp_path)


def test_deepspeed_zero3_on_one_gpu(tmp_path, tiny_ckpt, dataset, cpu_losses):
    pytest.importorskip("deepspeed")
    out = _train(tiny_ckpt, dataset, tmp_path / "run", "cuda", "--deepspeed", ZERO3)
    _check_run(out, cpu_losses)
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["derived"]["deepspeed_config"]["bf16"]["enabled"] is True  # "auto" from --dtype bfloat16
    _convert_matches_export(out, tmp_path)


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_lora_and_qlora_on_one_gpu(tmp_path, tiny_ckpt, dataset, cpu_losses, qlora):
    """LoRA (PEFT, bf16 autocast) and QLoRA (NF4 base through bitsandbytes): B starts at 0, so the first loss
    is the base model's (the CPU run's first loss); the adapter is PEFT's and applies on the CPU."""
    import parrot

    if qlora:
        pytest.importorskip("bitsandbytes")
    out = _train(tiny_ckpt, dataset, tmp_path / "run", "cuda", "--lora", *(["--quantize", "4"] if qlora else []))
    losses = read_losses(out)
    assert len(losses) == STEPS and np.isfinite(losses).all()
    tol = 1e-1 if qlora else 3e-2  # NF4 rounding of a tiny random model's weights / bf16
    assert abs(losses[0] - cpu_losses[0]) <= tol * abs(cpu_losses[0]), (losses[0], cpu_losses[0])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["peak_memory_gib"] > 0 for r in rows)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    m = parrot.load(tiny_ckpt, backend="cpu", adapter=out)
    assert np.isfinite(m.logits(m.encode_prompt("What is in the picture?", has_image=False))).all()
