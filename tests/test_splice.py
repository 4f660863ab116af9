"""The splice plan (parrot.model.splice) against a per-row Python reference, and both backends applying one plan."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import requires_mlx, requires_torch
from parrot.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from parrot.errors import ParrotError
from parrot.model.splice import plan_prompts, plan_splice

N = 4  # visual tokens per image


def _reference_row(ids, labels, n_visual, max_length):
    """Sources of one row's spliced positions: ("t", j) text token j, ("v", i) visual token i; with labels."""
    out = []
    for j, (i, lab) in enumerate(zip(ids, labels)):
        if i == IMAGE_TOKEN_INDEX:
            out += [(("v", v), IGNORE_INDEX) for v in range(n_visual)]
        else:
            out.append((("t", j), lab))
    return out[:max_length] if max_length is not None else out


def _random_batch(rng, B=5, T=9):
    ids = rng.integers(1, 50, (B, T))
    lengths = rng.integers(1, T + 1, B)
    mask = np.arange(T)[None] < lengths[:, None]
    for b in range(B):
        if rng.random() < 0.6:
            ids[b, rng.integers(0, lengths[b])] = IMAGE_TOKEN_INDEX
    labels = np.where(rng.random((B, T)) < 0.5, ids, IGNORE_INDEX)
    labels[ids == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
    return ids, mask, labels


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("max_length", [None, 7])
def test_plan_places_every_token_where_a_per_row_reference_does(side, max_length):
    rng = np.random.default_rng(0)
    for _ in range(30):
        ids, mask, labels = _random_batch(rng)
        B, T = ids.shape
        plan = plan_splice(ids, N, mask, labels, max_length, side)
        rows = [_reference_row(ids[b][mask[b]], labels[b][mask[b]], N, max_length) for b in range(B)]
        width = max(len(r) for r in rows)
        assert plan.gather.shape == (B, width)
        image_rows = [b for b in range(B) if (ids[b][mask[b]] == IMAGE_TOKEN_INDEX).any()]
        assert plan.image_rows.tolist() == image_rows
        zero = B * T + len(image_rows) * N
        for b, row in enumerate(rows):
            pad = width - len(row)
            start = pad if side == "left" else 0
            assert plan.lengths[b] == len(row)
            want_gather = [zero] * width
            want_labels = [IGNORE_INDEX] * width
            for p, ((kind, j), lab) in enumerate(row):
                want_gather[start + p] = b * T + j if kind == "t" else B * T + image_rows.index(b) * N + j
                want_labels[start + p] = lab
            assert plan.gather[b].tolist() == want_gather
            assert plan.labels[b].tolist() == want_labels
            assert plan.attention_mask[b].tolist() == [start <= p < start + len(row) for p in range(width)]
            assert plan.position_ids[b][start:start + len(row)].tolist() == list(range(len(row)))
            # the MoE's text context: valid text tokens whose label is ignored
            want_ctx = mask[b] & (ids[b] != IMAGE_TOKEN_INDEX) & (labels[b] == IGNORE_INDEX)
            assert plan.context[b].tolist() == want_ctx.tolist()


def test_plan_without_visual_tokens_drops_the_placeholder_and_refuses_two_images():
    plan = plan_prompts([[5, IMAGE_TOKEN_INDEX, 6], [7]], num_visual=0)
    assert plan.gather.tolist() == [[0, 2], [3, 6]] and plan.image_rows.size == 0
    with pytest.raises(ParrotError, match="more than one image placeholder"):
        plan_prompts([[IMAGE_TOKEN_INDEX, 1, IMAGE_TOKEN_INDEX]], N)


def _numpy_splice(plan, table, visual):
    """The reference: word embeddings from the table, visual tokens as given, zeros at padding."""
    B, T2 = plan.gather.shape
    C = table.shape[1]
    out = np.zeros((B, T2, C), np.float32)
    flat = np.concatenate([table[plan.text_ids].reshape(-1, C), visual.reshape(-1, C), np.zeros((1, C))])
    for b in range(B):
        for p in range(T2):
            out[b, p] = flat[plan.gather[b, p]]
    return out


@requires_torch
@requires_mlx
@pytest.mark.parametrize("side", ["right", "left"])
def test_both_backends_apply_a_plan_as_the_numpy_reference(tiny_ckpt, side):
    """Without the MoE, the visual tokens are the features themselves: both splices equal the reference."""
    import mlx.core as mx
    import torch

    import parrot

    t = parrot.load(tiny_ckpt, backend="cpu").model
    m = parrot.load(tiny_ckpt, backend="mlx").model
    t.model.moe_model.use_moe = m.moe_model.use_moe = False
    rng = np.random.default_rng(1)
    ids, mask, labels = _random_batch(rng, B=4, T=8)
    ids = np.where(ids == IMAGE_TOKEN_INDEX, ids, ids % t.config.vocab_size)
    n_visual = 5
    plan = plan_splice(ids, n_visual, mask, None, None, side)
    feats = rng.standard_normal((len(plan.image_rows), n_visual, t.config.hidden_size)).astype(np.float32)
    table = t.model.embed_tokens.weight.detach().numpy()
    want = _numpy_splice(plan, table, feats)
    with torch.no_grad():
        got_t = t.splice(plan, torch.from_numpy(feats)).numpy()
    got_m = np.array(m.splice(plan, mx.array(feats)))
    assert np.abs(got_t - want).max() < 1e-6
    assert np.abs(got_m - want).max() < 1e-6
