"""The MoE on both backends equals a float64 numpy version of docs/architecture.md, "Model facts" (3)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import requires_mlx, requires_torch
from parrot.testing import TinySpec, tiny_config


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def moe_reference(text, h_v, gate_w, experts, moe_weight):
    """float64: a = softmax(h_cls H_t^T / sqrt(C)) H_t; p = softmax(gate(a)); sum_i p_i E_i(H_v) + w H_v."""
    C = h_v.shape[-1]
    h_cls = h_v[0:1]
    a = softmax(h_cls @ text.T / np.sqrt(C)) @ text
    p = softmax(a @ gate_w.T)[0]
    silu = lambda x: x / (1 + np.exp(-x))  # noqa: E731
    out = sum(p[i] * ((silu(h_v @ g.T) * (h_v @ u.T)) @ d.T) for i, (g, u, d) in enumerate(experts))
    return out + moe_weight * h_v, p


def random_inputs(cfg, lengths, n_vis, seed=0):
    rng = np.random.default_rng(seed)
    C, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    gate = rng.standard_normal((E, C)) * 3 / np.sqrt(C)
    experts = [tuple(rng.standard_normal(s) / np.sqrt(s[1]) for s in ((I, C), (I, C), (C, I))) for _ in range(E)]
    T = max(lengths)
    text = rng.standard_normal((len(lengths), T, C))
    mask = np.arange(T)[None] < np.array(lengths)[:, None]
    h_v = rng.standard_normal((len(lengths), n_vis, C))
    return gate, experts, text, mask, h_v


CFG = tiny_config(TinySpec(moe_weight=0.3), vocab_size=100, tower_ref="x")
LENGTHS = [7, 3, 12]  # a batch of images whose prompts have different lengths (masked, padded)


@requires_torch
def test_torch_moe_matches_float64_numpy():
    import torch

    from parrot.backends.torch_cuda.model import MultilingualMoE

    gate, experts, text, mask, h_v = random_inputs(CFG, LENGTHS, n_vis=10)
    moe = MultilingualMoE(CFG).double()
    with torch.no_grad():
        moe.gate.weight.copy_(torch.from_numpy(gate))
        for e, (g, u, d) in zip(moe.experts, experts):
            e.gate_proj.weight.copy_(torch.from_numpy(g))
            e.up_proj.weight.copy_(torch.from_numpy(u))
            e.down_proj.weight.copy_(torch.from_numpy(d))
        tt, mm, hv = map(torch.from_numpy, (text, mask, h_v))
        got = moe(tt, mm, hv).numpy()
        p = moe.routing(tt, mm, hv[:, 0]).numpy()
    for b, n in enumerate(LENGTHS):
        want, want_p = moe_reference(text[b, :n], h_v[b], gate, experts, CFG.moe_weight)
        np.testing.assert_allclose(got[b], want, rtol=0, atol=1e-10)
        np.testing.assert_allclose(p[b], want_p, rtol=0, atol=1e-12)
        assert abs(p[b].sum() - 1) < 1e-12
    # the residual is MoE(H_v) + moe_weight * H_v (the code), not H_v + a * MoE(H_v) (the paper)
    moe.moe_weight = 0.0
    with torch.no_grad():
        no_res = moe(tt, mm, hv).numpy()
    np.testing.assert_allclose(got - no_res, CFG.moe_weight * h_v, atol=1e-10)


@requires_mlx
def test_mlx_moe_matches_float64_numpy():
    import mlx.core as mx

    from parrot.backends.mlx.model import MultilingualMoE

    gate, experts, text, mask, h_v = random_inputs(CFG, LENGTHS, n_vis=10, seed=1)
    moe = MultilingualMoE(CFG)
    moe.gate.weight = mx.array(gate.astype(np.float32))
    for e, (g, u, d) in zip(moe.experts, experts):
        e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight = (mx.array(w.astype(np.float32)) for w in (g, u, d))
    f32 = lambda a: mx.array(a.astype(np.float32))  # noqa: E731
    got = np.array(moe(f32(text), mx.array(mask), f32(h_v)))
    p = np.array(moe.routing(f32(text), mx.array(mask), f32(h_v[:, 0])))
    for b, n in enumerate(LENGTHS):
        want, want_p = moe_reference(text[b, :n], h_v[b], gate, experts, CFG.moe_weight)
        np.testing.assert_allclose(got[b], want, rtol=0, atol=2e-5)
        np.testing.assert_allclose(p[b], want_p, rtol=0, atol=1e-6)
        assert abs(p[b].sum() - 1) < 1e-6


@pytest.mark.parametrize("use_moe", [True, False])
@requires_torch
def test_moe_bypass_returns_visual_features_unchanged(use_moe):
    import torch

    from parrot.backends.torch_cuda.model import MultilingualMoE

    cfg = tiny_config(TinySpec(use_moe=use_moe), vocab_size=100, tower_ref="x")
    _, _, text, mask, h_v = random_inputs(cfg, [4], n_vis=5)
    out = MultilingualMoE(cfg).double()(torch.from_numpy(text), torch.from_numpy(mask), torch.from_numpy(h_v))
    assert np.array_equal(out.detach().numpy(), h_v) == (not use_moe)
