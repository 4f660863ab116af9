"""Half-precision loading: bf16 / fp16 on both backends stay close to the fp32 reference."""

from __future__ import annotations

import numpy as np
import pytest

import parrot
from conftest import random_image, requires_mlx, requires_torch
from parrot.testing import write_tiny_checkpoint

HALF = ["bfloat16", "float16"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = write_tiny_checkpoint(tmp_path_factory.mktemp("dt") / "c", seed=4)
    ref = parrot.load(d, backend="cpu")
    ids = ref.encode_prompt("Describe the image.", True)
    px = ref.preprocess(random_image(26, 18))
    return d, ids, px, ref.logits(ids, px)


@requires_torch
@pytest.mark.parametrize("dtype", HALF)
def test_torch_half_precision_close_to_fp32(reference, dtype):
    d, ids, px, want = reference
    m = parrot.load(d, backend="cpu", dtype=dtype)
    assert next(m.model.parameters()).dtype.__str__().endswith(dtype)
    got = m.logits(ids, px)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() < 0.35 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.8


@requires_mlx
@pytest.mark.parametrize("dtype", HALF)
def test_mlx_half_precision_close_to_fp32(reference, dtype):
    d, ids, px, want = reference
    got = parrot.load(d, backend="mlx", dtype=dtype).logits(ids, px)
    assert np.abs(got - want).max() < 0.35 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.8


@requires_torch
def test_default_dtype_is_the_checkpoint_torch_dtype(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "bf", dtype="bfloat16")
    assert parrot.load(d).dtype == "bfloat16"
