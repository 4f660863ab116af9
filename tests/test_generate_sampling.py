"""Sampling: the top-p filter against a float64 reference, sampled frequencies, seeds, bad settings."""

from __future__ import annotations

import numpy as np
import pytest

import parrot
from conftest import BACKENDS
from parrot.errors import ParrotError
from parrot.inference.generation import SamplingParams


def reference_nucleus(logits: np.ndarray, top_p: float) -> np.ndarray:
    """float64: the most likely tokens, in order, until their probability reaches top_p."""
    p = np.exp(logits - logits.max())
    p /= p.sum()
    keep = np.zeros(len(p), dtype=bool)
    total = 0.0
    for i in np.argsort(-p, kind="stable"):
        keep[i] = True
        total += p[i]
        if total >= top_p:
            break
    return keep


def backend_ops(backend):
    """(top_p_filter on a numpy [1, V] array -> numpy, Sampler(params) on numpy logits -> int)."""
    if backend == "cpu":
        import torch

        from parrot.backends.torch_cuda.generate import Sampler, top_p_filter

        def filt(x, top_p):
            return top_p_filter(torch.from_numpy(x), top_p).numpy()

        def sampler(params):
            s = Sampler(params, torch.device("cpu"))
            return lambda x: int(s(torch.from_numpy(x)).item())
    else:
        import mlx.core as mx

        from parrot.backends.mlx.generate import Sampler, top_p_filter

        def filt(x, top_p):
            return np.array(top_p_filter(mx.array(x), top_p))

        def sampler(params):
            s = Sampler(params)
            return lambda x: int(s(mx.array(x)).item())
    return filt, sampler


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_filter_keeps_the_reference_nucleus(backend):
    filt, _ = backend_ops(backend)
    rng = np.random.default_rng(1)
    for _ in range(20):
        logits = (rng.standard_normal(50) * 2).astype(np.float32)
        for top_p in (0.05, 0.3, 0.5, 0.9, 0.99):
            kept = np.isfinite(filt(logits[None], top_p)[0])
            np.testing.assert_array_equal(kept, reference_nucleus(logits.astype(np.float64), top_p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_frequencies_follow_tempered_nucleus_probabilities(backend):
    _, make = backend_ops(backend)
    logits = np.array([[2.0, 1.5, 1.0, 0.0, -1.0]], dtype=np.float32)
    temperature, top_p, n = 0.8, 0.85, 3000
    sample = make(SamplingParams(temperature=temperature, top_p=top_p, seed=5))
    counts = np.bincount([sample(logits) for _ in range(n)], minlength=5)
    z = logits[0].astype(np.float64) / temperature
    keep = reference_nucleus(z, top_p)
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    assert counts[~keep].sum() == 0
    sigma = np.sqrt(n * p * (1 - p)) + 1e-9
    assert np.all(np.abs(counts - n * p) < 4.5 * sigma + 1), (counts, n * p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_sampling_is_reproducible(backend, tiny_ckpt):
    m = parrot.load(tiny_ckpt, backend=backend)
    kw = dict(max_tokens=24, temperature=1.0, top_p=0.95)
    a = m.generate("Hello", None, seed=7, **kw)
    b = m.generate("Hello", None, seed=7, **kw)
    c = m.generate("Hello", None, seed=8, **kw)
    greedy = m.generate("Hello", None, max_tokens=24)
    assert a.tokens == b.tokens and a.seed == 7
    assert a.tokens != c.tokens
    assert a.tokens != greedy.tokens
    unseeded = m.generate("Hello", None, **kw)
    assert unseeded.seed is not None  # the seed drawn is reported, so the answer can be reproduced
    assert m.generate("Hello", None, seed=unseeded.seed, **kw).tokens == unseeded.tokens
    assert m.generate("Hello", None, max_tokens=24, temperature=1.0, top_p=1e-6, seed=3).tokens == greedy.tokens


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=2.5), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_sampling_settings_are_refused(kwargs, needle):
    with pytest.raises(ParrotError, match=needle):
        SamplingParams(**kwargs)
