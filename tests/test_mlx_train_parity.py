"""The MLX trainer computes the torch trainer's function: same loss, same gradients, same trajectory."""

from __future__ import annotations

import json

import numpy as np
import pytest
from train_helpers import read_losses, write_dataset

from conftest import requires_mlx, requires_torch
from parrot.storage.safetensors_io import CheckpointFiles
from parrot.training.config import TrainConfig
from parrot.training.data import LlavaData, collate

pytestmark = [requires_mlx, requires_torch]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n=6)


def _batch(ckpt, data_path, image_dir, order, max_length=2048, truncate=False):
    from parrot.model.tokenizer import Tokenizer
    from parrot.training.source import open_source

    tc = TrainConfig(stage=2, data=str(data_path), output="unused", model=str(ckpt))
    src = open_source(tc)
    tok = Tokenizer.from_dir(src.tokenizer_dir)
    data = LlavaData(data_path, image_dir, tok, src.tower.image, src.config.num_visual_tokens(src.tower.config),
                     max_length, truncate)
    return src, collate([data.item(i) for i in order], tok.pad_id)


@pytest.fixture(scope="module")
def both(tiny_ckpt, dataset):
    """Loss and gradients of one padded batch (image multi-turn, text-only, image single-turn) on both backends."""
    import mlx.core as mx
    import mlx.nn as nn
    import torch
    from mlx.utils import tree_flatten

    from parrot.backends.mlx.train.build import build_model as build_mlx
    from parrot.backends.mlx.train.build import set_trainable as trainable_mlx
    from parrot.backends.mlx.train.step import loss_sum, prepare
    from parrot.backends.torch_cuda.model import causal_lm_loss_sum
    from parrot.backends.torch_cuda.train.build import build_model as build_torch
    from parrot.backends.torch_cuda.train.build import set_trainable as trainable_torch
    from parrot.model.layout import mlx_to_official_array, mlx_to_official_key

    src, batch = _batch(tiny_ckpt, *dataset, order=[2, 1, 0])
    assert batch["has_image"].tolist() == [True, False, True] and not batch["attention_mask"].all()
    n = batch["num_label_tokens"]

    tm = build_torch(src, "cpu", seed=0)
    trainable_torch(tm, 2, True, False)
    tb = {k: torch.from_numpy(v) for k, v in batch.items() if isinstance(v, np.ndarray) and k != "has_image"}
    logits, s = tm(tb["input_ids"], tb["attention_mask"], tb["pixel_values"], tb["labels"])
    t_loss, t_count = causal_lm_loss_sum(logits, s.labels)
    (t_loss / n).backward()
    t_grads = {k: p.grad.numpy() for k, p in tm.named_parameters() if p.grad is not None}

    tc = TrainConfig(stage=2, data="x", output="y", model=str(tiny_ckpt)).resolved()
    mm = build_mlx(src, seed=0)
    trainable_mlx(mm, tc)
    mb = prepare(batch, src.config.num_visual_tokens(src.tower.config), None)
    (m_loss, m_grads) = nn.value_and_grad(mm, lambda: loss_sum(mm, mb) / n)()
    mx.eval(m_loss, m_grads)
    m_grads = {mlx_to_official_key(k): mlx_to_official_array(mlx_to_official_key(k), np.array(g))
               for k, g in tree_flatten(m_grads)}
    return {"torch_loss": float(t_loss.detach()) / n, "mlx_loss": float(m_loss),
            "count": (int(t_count), mb.num_labels, n), "torch_grads": t_grads, "mlx_grads": m_grads}


def test_mlx_first_step_loss_equals_torch(both):
    assert both["count"][0] == both["count"][1] == both["count"][2] > 20
    assert 1.0 < both["torch_loss"] < 20.0
    assert abs(both["mlx_loss"] - both["torch_loss"]) < 1e-5, (both["mlx_loss"], both["torch_loss"])


def test_mlx_gradients_of_projector_and_moe_match_torch(both):
    t, m = both["torch_grads"], both["mlx_grads"]
    assert t.keys() == m.keys()  # the same trainable set: projector, MoE, LLM (vision frozen)
    checked = [k for k in t if k.startswith(("model.mm_projector.", "model.moe_model."))]
    assert len(checked) == 4 + 1 + 6 * 3
    for k in checked:
        assert np.abs(t[k]).max() > 1e-6, k  # every one of them really gets a gradient from this batch
        assert np.abs(m[k] - t[k]).max() < 1e-4, (k, np.abs(m[k] - t[k]).max())
    for k in t:  # the LLM's too (embeddings, layers, lm_head), relative to their size
        assert np.abs(m[k] - t[k]).max() <= 1e-4 * max(1.0, np.abs(t[k]).max()), k


def test_mlx_splice_matches_torch_splice_with_truncation(tiny_ckpt, dataset):
    """One plan (right padding, the MoE's training context, truncation after the visual tokens) applied by
    both backends: the same embeddings position by position, and the labels where a per-row reference puts them."""
    import mlx.core as mx
    import torch

    import parrot
    from parrot.model.splice import plan_splice

    src, batch = _batch(tiny_ckpt, *dataset, order=[1, 2, 0], max_length=100, truncate=True)
    t = parrot.load(tiny_ckpt, backend="cpu").model
    m = parrot.load(tiny_ckpt, backend="mlx").model
    n_visual = src.config.num_visual_tokens(src.tower.config)
    plan = plan_splice(batch["input_ids"], n_visual, batch["attention_mask"], batch["labels"], max_length=100)
    rows = plan.image_rows
    assert rows.tolist() == [1, 2] and plan.gather.shape[1] == 100 and plan.lengths[0] < 100  # truncated, padded
    with torch.no_grad():
        want = t.splice(plan, t.encode_images(torch.from_numpy(batch["pixel_values"][rows]))).numpy()
    emb = np.array(m.splice(plan, m.encode_images(mx.array(batch["pixel_values"][rows]))))
    for b in range(len(plan.lengths)):  # labels: each row's own, the placeholder widened to n_visual ignored ones
        n = int(batch["attention_mask"][b].sum())
        row = [lab for i, lab in zip(batch["input_ids"][b][:n], batch["labels"][b][:n])
               for lab in ([-100] * n_visual if i == -200 else [lab])][:100]
        assert plan.labels[b].tolist() == row + [-100] * (100 - len(row))
    valid = plan.attention_mask
    diff = np.abs(emb - want)[valid]
    assert diff.max() < 1e-5, diff.max()
    assert not emb[~valid].any() and not want[~valid].any()  # padding is zeros


def _train(tmp_path, name, backend, model, data, image_dir, **kw):
    from parrot.training import train

    args = dict(stage=2, data=str(data), image_dir=str(image_dir), output=str(tmp_path / name), model=str(model),
                backend=backend, num_workers=0)
    args.update(kw)
    return train(TrainConfig(**args), progress=False)


def test_full_finetuning_tracks_the_torch_losses(tmp_path, tiny_ckpt, dataset):
    """Five AdamW steps, 2 x 2 accumulation, warmup + cosine, gradient checkpointing: the same curve."""
    common = dict(max_steps=5, batch_size=2, grad_accum=2, lr=2e-3, warmup_ratio=0.2)
    t = _train(tmp_path, "torch", "cpu", tiny_ckpt, *dataset, **common)
    m = _train(tmp_path, "mlx", "mlx", tiny_ckpt, *dataset, **common)
    lt, lm = read_losses(t), read_losses(m)
    assert lt[-1] < lt[1] - 0.3  # it trains (step 1 runs at lr 0: warmup)
    np.testing.assert_allclose(lm, lt, rtol=2e-6, atol=0)  # measured: 2e-7
    rows_t = [json.loads(x) for x in (t / "metrics.jsonl").read_text().splitlines()]
    rows_m = [json.loads(x) for x in (m / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows_t, rows_m):
        assert a["lr"] == b["lr"] and a["num_label_tokens"] == b["num_label_tokens"]
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"]
        assert a["padding_fraction"] == b["padding_fraction"] and b["peak_memory_gib"] > 0
    wt, wm = CheckpointFiles(t), CheckpointFiles(m)
    assert sorted(wt.keys()) == sorted(wm.keys())  # the same export: official layout, CLIP's unused layer too
    diff = max(np.abs(wt.read(k) - wm.read(k)).max() for k in wt.keys())
    assert diff < 1e-5, diff  # measured: 5e-7
