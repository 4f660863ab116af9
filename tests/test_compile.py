"""The mx.compile'd MLX pieces compute what their uncompiled forms compute. conftest sets MLX_DISABLE_COMPILE=1
for the suite (compiling JIT-builds C++ on Linux); this module turns compilation on for its own cases
(mx.enable_compile, the in-process form of unsetting the variable) and off again afterwards."""

from __future__ import annotations

import numpy as np
import pytest
from train_helpers import read_losses, write_dataset

from conftest import requires_mlx
from parrot.inference.generation import SamplingParams, generate_stream
from parrot.training.config import TrainConfig

pytestmark = requires_mlx


@pytest.fixture
def compiled():
    import mlx.core as mx

    mx.enable_compile()
    traced = []

    @mx.compile
    def f(x):
        traced.append(1)  # a Python side effect runs only while tracing
        return x + 1

    for x in (1.0, 2.0, 3.0):
        f(mx.array([x]))
    n = len(traced)
    f(mx.array([4.0]))
    assert len(traced) == n, "mx.compile is not active"  # a cached trace
    try:
        yield mx
    finally:
        mx.disable_compile()


def _both(mx, fn):
    """fn() with compilation on, then off."""
    on = fn()
    mx.disable_compile()
    try:
        return on, fn()
    finally:
        mx.enable_compile()


def test_compiled_training_steps_give_the_same_losses_and_weights(compiled, tmp_path, tiny_ckpt):
    """AdamW's compiled per-parameter update (+ the fused quick-GELU / SwiGLU kernels in the forward)."""
    from parrot.storage.safetensors_io import CheckpointFiles
    from parrot.training import train

    data, images = write_dataset(tmp_path / "data", n=6)
    runs = iter(("on", "off"))

    def run():
        out = tmp_path / next(runs)
        train(TrainConfig(stage=2, data=str(data), image_dir=str(images), output=str(out), model=str(tiny_ckpt),
                          backend="mlx", batch_size=2, grad_accum=1, max_steps=3, lr=3e-3, warmup_ratio=0.0,
                          weight_decay=0.1, num_workers=0), progress=False)
        return out

    on, off = _both(compiled, run)
    a, b = read_losses(on), read_losses(off)
    assert len(a) == 3 and a[0] != a[2]
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    wa, wb = CheckpointFiles(on), CheckpointFiles(off)
    for k in wa.keys():
        np.testing.assert_allclose(wa.read(k), wb.read(k), rtol=0, atol=1e-6, err_msg=k)


def test_compiled_adamw_update_equals_the_uncompiled_one_exactly(compiled):
    from parrot.backends.mlx.train.optim import TorchAdamW

    mx = compiled
    rng = np.random.default_rng(0)
    params = {"w": mx.array(rng.standard_normal((7, 5)).astype(np.float32)),
              "b": mx.array(rng.standard_normal(5).astype(np.float32))}
    grads = [{k: mx.array(rng.standard_normal(v.shape).astype(np.float32)) for k, v in params.items()}
             for _ in range(3)]

    def run():
        opt = TorchAdamW(1e-2, weight_decay=0.1)
        p = dict(params)
        opt.init(p)
        for g in grads:
            p = opt.apply_gradients(g, p)
        return {k: np.array(v) for k, v in p.items()}

    on, off = _both(mx, run)
    for k in on:
        assert np.array_equal(on[k], off[k]), (k, np.abs(on[k] - off[k]).max())
    assert not np.array_equal(on["w"], np.array(params["w"]))


def test_compiled_sampling_and_vision_give_the_same_tokens(compiled, tiny_ckpt):
    import parrot
    from parrot.inference.bench import synthetic_image

    model = parrot.load(tiny_ckpt, backend="mlx")
    pixels = model.preprocess(synthetic_image(model, seed=3))
    ids = model.encode_prompt("Describe the image.", True)

    def run():
        sampled = generate_stream(model, ids, pixels, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, seed=5),
                                  stop=frozenset()).consume().tokens
        greedy = generate_stream(model, ids, pixels, SamplingParams(max_tokens=12), stop=frozenset()).consume().tokens
        return sampled, greedy, model.logits(ids, pixels)

    (s_on, g_on, l_on), (s_off, g_off, l_off) = _both(compiled, run)
    assert s_on == s_off and g_on == g_off and len(s_on) == 12
    assert s_on != g_on  # the sampler really sampled
    assert np.abs(l_on - l_off).max() < 1e-5
