"""Sharding options that cannot work fail before any process group starts, with one clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import write_dataset

from conftest import assert_clean_failure, requires_torch, run_parrot
from parrot.backends.torch_cuda.train.data import rank_micro_batches
from parrot.training.schedule import StepPlan

pytestmark = requires_torch
ZERO2 = Path(__file__).resolve().parent.parent / "configs" / "zero2.json"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n=6)


def _train(tiny_ckpt, dataset, out, *extra, env=None):
    data, images = dataset
    return run_parrot("train", "--backend", "cpu", "--stage", "2", "--model", tiny_ckpt, "--data", data,
                      "--image-dir", images, "--output", out, "--num-workers", "0", *extra, env=env)


def test_several_processes_need_a_sharding_option(tmp_path, tiny_ckpt, dataset):
    p = _train(tiny_ckpt, dataset, tmp_path / "o", env={"WORLD_SIZE": "2", "RANK": "0"})
    assert_clean_failure(p, "launched with 2 processes", "--deepspeed", "--fsdp")


def test_deepspeed_and_fsdp_together_are_refused(tmp_path, tiny_ckpt, dataset):
    assert_clean_failure(_train(tiny_ckpt, dataset, tmp_path / "o", "--fsdp", "--deepspeed", ZERO2), "choose one")


@pytest.mark.slow  # runs DeepSpeed
def test_bad_deepspeed_configs_fail_cleanly(tmp_path, tiny_ckpt, dataset):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 2}}')
    assert_clean_failure(_train(tiny_ckpt, dataset, tmp_path / "a", "--deepspeed", bad, "--batch-size", "2"),
                         "train_micro_batch_size_per_gpu=3 but --batch-size gives 2", '"auto"')
    assert_clean_failure(_train(tiny_ckpt, dataset, tmp_path / "b", "--deepspeed", tmp_path / "none.json"),
                         "none.json", "not found")
    fp16 = tmp_path / "fp16.json"
    fp16.write_text('{"fp16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}')
    assert_clean_failure(_train(tiny_ckpt, dataset, tmp_path / "c", "--deepspeed", fp16, "--dtype", "float16"),
                         "fp16 needs CUDA")


@pytest.mark.slow  # runs DeepSpeed
def test_resume_under_another_sharding_is_refused(tmp_path, tiny_ckpt, dataset):
    out = tmp_path / "run"
    first = _train(tiny_ckpt, dataset, out, "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--fsdp")
    assert first.returncode == 0, first.stderr
    again = _train(tiny_ckpt, dataset, out, "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1",
                   "--deepspeed", ZERO2, "--resume")
    assert_clean_failure(again, "--resume", "sharding fsdp -> deepspeed")
    other_batch = _train(tiny_ckpt, dataset, out, "--max-steps", "1", "--batch-size", "2", "--grad-accum", "2",
                         "--fsdp", "--resume")
    assert_clean_failure(other_batch, "global batch: --grad-accum 1 x 1 process(es) -> 2 x 1")


def test_a_rank_left_without_samples_gets_filler_micro_batches():
    """5 samples, global batch 2 x 2 ranks: the last step has one sample; rank 1 runs a filler so that both
    ranks make the same number of forwards (collectives), and a rank never runs fewer than the busiest."""
    p = StepPlan(5, batch_size=2, grad_accum=1, seed=0, world_size=2)
    last = [rank_micro_batches(p, 1, r, 2) for r in range(2)]
    assert [len(x) for x in last] == [1, 1]
    assert last[0][0] == (p.global_batch_at(1), False) and last[1][0] == (p.global_batch_at(1)[:1], True)
    full = [rank_micro_batches(p, 0, r, 2) for r in range(2)]
    assert [f for r in full for _, f in r] == [False, False]
    q = StepPlan(7, batch_size=1, grad_accum=2, seed=0, world_size=2)  # last step: 3 samples, 2 + 1 micro-batches
    assert [[f for _, f in rank_micro_batches(q, 1, r, 2)] for r in range(2)] == [[False, False], [False, True]]
