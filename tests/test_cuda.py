"""CUDA checks: run on a GPU machine (scripts/gpu_check.sh); skipped where torch sees no GPU."""

from __future__ import annotations

import numpy as np
import pytest

import parrot
from conftest import random_image

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-3), ("bfloat16", None)])
def test_cuda_logits_match_cpu(tiny_variant, dtype, tol):
    cpu = parrot.load(tiny_variant, backend="cpu")
    gpu = parrot.load(tiny_variant, backend="cuda", dtype=dtype)
    ids = cpu.encode_prompt("Describe the image.", True)
    px = cpu.preprocess(random_image(31, 20))
    want, got = cpu.logits(ids, px), gpu.logits(ids, px)
    if tol is not None:  # TF32 may be on for matmuls: a looser bound than CPU fp32
        assert np.abs(got - want).max() <= tol
    else:
        assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.8


def test_cuda_padded_batch_matches_one_by_one(tiny_ckpt):
    m = parrot.load(tiny_ckpt, backend="cuda")
    batch = [(m.encode_prompt("Describe it.", True), m.preprocess(random_image(40, 25, 1))),
             (m.encode_prompt("hello there", False), None)]
    singles = [m.logits(i, p) for i, p in batch]
    for got, want in zip(m.batch_logits(batch, padding_side="left"), singles):
        assert np.abs(got - want).max() <= 2e-3
