"""official -> MLX -> official is bit-exact (every tensor, unused CLIP layer included), fp32 and bf16."""

from __future__ import annotations

import numpy as np
import pytest

import parrot
from conftest import random_image, requires_mlx, requires_torch
from parrot.convert.core import convert_checkpoint
from parrot.model.layout import PATCH_EMBED, detect_layout
from parrot.storage.safetensors_io import CheckpointFiles
from parrot.testing import write_tiny_checkpoint


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_official_mlx_official_is_bit_exact(tmp_path, dtype):
    src = write_tiny_checkpoint(tmp_path / "src", dtype=dtype, seed=7, max_shard_bytes=80_000)
    convert_checkpoint(src, tmp_path / "mlx", to="mlx")
    convert_checkpoint(tmp_path / "mlx", tmp_path / "back", to="hf")
    a, m, b = (CheckpointFiles(tmp_path / n) for n in ("src", "mlx", "back"))
    assert detect_layout(m.keys()) == "mlx" and detect_layout(b.keys()) == "official"
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        x, y = a.read(k), b.read(k)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k
    # the MLX layout really is different: channels-last patch conv, prefixed names
    conv = "vision_tower." + PATCH_EMBED
    assert m.info(conv).shape == (48, 6, 6, 3) and a.info("model.vision_tower.vision_tower." + PATCH_EMBED).shape == (
        48, 3, 6, 6)
    assert m.stored_dtype() == dtype


@requires_mlx
@requires_torch
def test_mlx_layout_loads_on_both_backends_with_same_logits(tmp_path):
    src = write_tiny_checkpoint(tmp_path / "src", seed=2)
    dst = convert_checkpoint(src, tmp_path / "mlx", to="mlx").path
    ref = parrot.load(src, backend="cpu")
    ids = ref.encode_prompt("What colour is it?", True)
    px = ref.preprocess(random_image(22, 14))
    want = ref.logits(ids, px)
    for backend in ("cpu", "mlx"):
        got = parrot.load(dst, backend=backend).logits(ids, px)
        assert np.abs(got - want).max() <= 1e-4


def test_conversion_can_change_dtype(tmp_path):
    src = write_tiny_checkpoint(tmp_path / "src", seed=1)
    convert_checkpoint(src, tmp_path / "bf16", to="mlx", dtype="bfloat16")
    f = CheckpointFiles(tmp_path / "bf16")
    assert f.stored_dtype() == "bfloat16"
    k = "language_model.model.layers.0.mlp.up_proj.weight"
    want = CheckpointFiles(src).read("model.layers.0.mlp.up_proj.weight")
    np.testing.assert_allclose(f.read(k).astype(np.float32), want, rtol=1e-2, atol=1e-2)
