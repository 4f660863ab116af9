"""Padding-free training (`parrot train --packing`): a micro-batch's samples as one row, each sample's
positions from 0, attention within each sample, the MoE's text context per sample. Per-sample losses and
gradients equal the padded batch's (fp32, 1e-5) on both backends; runs resume exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from train_helpers import read_losses, write_dataset

from conftest import BACKENDS, requires_cuda, requires_torch
from parrot.model.splice import pack_plan, plan_splice
from parrot.training.config import TrainConfig
from parrot.training.data import LlavaData, collate

IGNORE, IMAGE = -100, -200


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n=8)


def test_pack_plan_puts_the_rows_back_to_back():
    ids = np.array([[5, IMAGE, 6, 7, 0], [8, 9, 0, 0, 0], [IMAGE, 1, 2, 3, 4]])
    mask = ids != 0
    mask[2] = True
    labels = np.where(mask, np.array([[IGNORE, IGNORE, IGNORE, 7, 0], [8, 9, 0, 0, 0], [IGNORE, IGNORE, 2, 3, 4]]),
                      IGNORE)
    plan = plan_splice(ids, 3, mask, labels)
    packed = pack_plan(plan)
    lengths = plan.lengths.tolist()
    assert lengths == [6, 2, 7] and packed.shape == (1, 15)
    assert packed.cu_seqlens.tolist() == [0, 6, 8, 15]
    assert packed.position_ids[0].tolist() == [*range(6), *range(2), *range(7)]
    assert packed.attention_mask.all() and packed.lengths.tolist() == [15]
    for b, (s, n) in enumerate(zip(packed.cu_seqlens, lengths)):  # the same gather entries, row by row
        assert packed.gather[0, s:s + n].tolist() == plan.gather[b, :n].tolist()
        want = plan.labels[b, :n].copy()
        want[0] = IGNORE  # a sample's first label would be predicted from the previous sample's last position
        assert packed.labels[0, s:s + n].tolist() == want.tolist()
    assert packed.labels[0, 6] == IGNORE and plan.labels[1, 0] == 8  # row 1 starts with a label: dropped
    # the labels that enter the loss (after the shift) are the padded batch's, in order
    assert [x for x in packed.labels[0, 1:] if x != IGNORE] == [x for r in plan.labels[:, 1:] for x in r if x != IGNORE]
    assert packed.context is plan.context and packed.image_rows.tolist() == [0, 2]  # MoE inputs untouched


def test_pack_plan_refuses_left_padding_and_missing_labels():
    ids = np.array([[1, 2, 3], [4, 5, 0]])
    with pytest.raises(ValueError, match="right-padded"):
        pack_plan(plan_splice(ids, 0, ids != 0, ids, padding_side="left"))
    with pytest.raises(ValueError, match="labels"):
        pack_plan(plan_splice(ids, 0, ids != 0))


def _batch(ckpt, data_path, image_dir, order):
    from parrot.model.tokenizer import Tokenizer
    from parrot.training.source import open_source

    src = open_source(TrainConfig(stage=2, data=str(data_path), output="unused", model=str(ckpt)))
    tok = Tokenizer.from_dir(src.tokenizer_dir)
    data = LlavaData(data_path, image_dir, tok, src.tower.image, src.config.num_visual_tokens(src.tower.config))
    return src, collate([data.item(i) for i in order], tok.pad_id)


def _per_token_nll(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float64 next-token NLL at each position t (predicting labels[t + 1]); 0 where the label is ignored."""
    lg = logits[:-1].astype(np.float64)
    lg = lg - lg.max(-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    tgt = labels[1:]
    out = np.zeros(len(tgt))
    keep = tgt != IGNORE
    out[keep] = -logp[np.flatnonzero(keep), tgt[keep]]
    return out


def _torch_run(src, batch, packing: bool, sample: int | None, device: str = "cpu", flash: bool = False,
               bf16: bool = False):
    """(per-token NLL [rows of the plan], the plan, gradients of the summed loss of `sample` or of all)."""
    import contextlib

    import torch

    from parrot.backends.torch_cuda.model import causal_lm_loss_sum
    from parrot.backends.torch_cuda.train.build import build_model, enable_activation_checkpointing, set_trainable

    model = build_model(src, device, seed=0)
    set_trainable(model, 2, True, False)
    enable_activation_checkpointing(model)
    model.train()
    if flash:
        model.model.config._attn_implementation = "flash_attention_2"
    tb = {k: torch.from_numpy(v) for k, v in batch.items() if isinstance(v, np.ndarray) and k != "has_image"}
    autocast = torch.autocast("cuda", torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        logits, plan = model(tb["input_ids"], tb["attention_mask"], tb["pixel_values"].to(device), tb["labels"],
                             packing=packing)
    labels = plan.labels.copy()
    if sample is not None:  # the loss of one sample only
        keep = np.zeros_like(labels, bool)
        if packing:
            keep[0, plan.cu_seqlens[sample]:plan.cu_seqlens[sample + 1]] = True
        else:
            keep[sample] = True
        labels[~keep] = IGNORE
    loss, _ = causal_lm_loss_sum(logits, labels)
    loss.backward()
    nll = [_per_token_nll(row, lab) for row, lab in zip(logits.detach().float().cpu().numpy(), plan.labels)]
    grads = {k: p.grad.float().cpu().numpy().copy() for k, p in model.named_parameters() if p.grad is not None}
    return nll, plan, grads


def _mlx_run(src, batch, packing: bool, sample: int | None):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from parrot.backends.mlx.train.build import build_model, enable_grad_checkpoint, set_trainable
    from parrot.backends.mlx.train.step import full_logits, loss_sum, prepare

    tc = TrainConfig(stage=2, data="x", output="y", model="m").resolved()
    model = build_model(src, seed=0)
    set_trainable(model, tc)
    enable_grad_checkpoint(model)
    model.train()
    mb = prepare(batch, src.config.num_visual_tokens(src.tower.config), None, packing)
    plan = mb.plan
    nll = [_per_token_nll(row, lab) for row, lab in zip(np.array(full_logits(model, mb)), plan.labels)]
    if sample is not None:
        labels = plan.labels.copy()
        keep = np.zeros_like(labels, bool)
        if packing:
            keep[0, plan.cu_seqlens[sample]:plan.cu_seqlens[sample + 1]] = True
        else:
            keep[sample] = True
        labels[~keep] = IGNORE
        rows, cols = np.nonzero(labels[:, 1:] != IGNORE)
        mb.rows, mb.cols = mx.array(rows.astype(np.int32)), mx.array(cols.astype(np.int32))
        mb.targets = mx.array(labels[:, 1:][rows, cols].astype(np.int32))
    _, grads = nn.value_and_grad(model, lambda: loss_sum(model, mb))()
    mx.eval(grads)
    return nll, plan, {k: np.array(g) for k, g in tree_flatten(grads)}


RUNS = {"cpu": _torch_run, "mlx": _mlx_run}


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_losses_and_gradients_equal_the_padded_batch(backend, tiny_ckpt, dataset):
    """Image multi-turn, text-only and image single-turn samples of different lengths; gradient checkpointing
    on (the packed bounds must hold when a layer is recomputed in the backward pass)."""
    src, batch = _batch(tiny_ckpt, *dataset, order=[2, 1, 0])
    assert batch["has_image"].tolist() == [True, False, True] and not batch["attention_mask"].all()
    run = RUNS[backend]
    nll_pad, plan_pad, g_pad = run(src, batch, False, None)
    nll_pack, plan_pack, g_pack = run(src, batch, True, None)
    cu = plan_pack.cu_seqlens
    assert plan_pack.shape == (1, int(plan_pad.lengths.sum())) and plan_pad.shape[0] * plan_pad.shape[1] > cu[-1]
    flat = nll_pack[0]
    for b, n in enumerate(plan_pad.lengths):
        per_pad = nll_pad[b][:n - 1]  # the row's own next-token terms
        per_pack = flat[cu[b]:cu[b + 1] - 1]
        count = int((plan_pad.labels[b, 1:] != IGNORE).sum())
        assert count > 3 and np.count_nonzero(per_pack) == count
        assert abs(per_pack.sum() / count - per_pad.sum() / count) < 1e-5, b
        assert np.abs(per_pack - per_pad).max() < 1e-5, b
        if b + 1 < len(plan_pad.lengths):
            assert flat[cu[b + 1] - 1] == 0  # the last position of a sample predicts nothing
    assert g_pad.keys() == g_pack.keys() and len(g_pad) > 20
    for k in g_pad:
        scale = max(1.0, float(np.abs(g_pad[k]).max()))
        assert np.abs(g_pack[k] - g_pad[k]).max() <= 1e-5 * scale, (k, np.abs(g_pack[k] - g_pad[k]).max())

    # one sample's loss alone: its gradient does not see the samples packed around it
    _, _, g1_pad = run(src, batch, False, 1)
    _, _, g1_pack = run(src, batch, True, 1)
    moved = [k for k in g1_pad if np.abs(g1_pad[k]).max() > 1e-7]
    assert moved
    for k in g1_pad:
        scale = max(1.0, float(np.abs(g1_pad[k]).max()))
        assert np.abs(g1_pack[k] - g1_pad[k]).max() <= 1e-5 * scale, k


def _train(tmp_path, name, backend, model, data, image_dir, stop_after=None, **kw):
    from parrot.training import train

    args = dict(stage=2, data=str(data), image_dir=str(image_dir), output=str(tmp_path / name), model=str(model),
                backend=backend, batch_size=3, grad_accum=1, num_workers=0, max_steps=3, lr=3e-3,
                warmup_ratio=0.0)
    args.update(kw)
    return train(TrainConfig(**args), stop_after=stop_after, progress=False)


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_training_tracks_the_padded_run_and_resumes_exactly(backend, tmp_path, tiny_ckpt, dataset):
    padded = _train(tmp_path, "pad", backend, tiny_ckpt, *dataset)
    packed = _train(tmp_path, "pack", backend, tiny_ckpt, *dataset, packing=True)
    np.testing.assert_allclose(read_losses(packed), read_losses(padded), rtol=0, atol=1e-5)
    assert all(r["padding_fraction"] > 0 for r in _metrics(padded))
    assert all(r["padding_fraction"] == 0 for r in _metrics(packed))
    assert json.loads((packed / "run_config.json").read_text())["config"]["packing"] is True
    part = _train(tmp_path, "part", backend, tiny_ckpt, *dataset, packing=True, save_every=1, stop_after=2)
    assert len(read_losses(part)) == 2
    _train(tmp_path, "part", backend, tiny_ckpt, *dataset, packing=True, save_every=1, resume=True)
    assert read_losses(part) == read_losses(packed)  # exactly


@requires_torch
def test_cli_takes_packing(tmp_path, tiny_ckpt, dataset):
    from conftest import run_parrot_here

    data, images = dataset
    p = run_parrot_here("train", "--stage", "2", "--backend", "cpu", "--model", str(tiny_ckpt), "--data", str(data),
                        "--image-dir", str(images), "--output", str(tmp_path / "o"), "--max-steps", "1",
                        "--batch-size", "2", "--num-workers", "0", "--packing")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "attention within each sample (SDPA per sample)" in p.stdout + p.stderr
    assert _metrics(tmp_path / "o")[0]["padding_fraction"] == 0



@pytest.mark.cuda
@requires_cuda
def test_packing_on_cuda_per_sample_sdpa_and_flash_attention_varlen(tiny_ckpt, dataset):
    """On a GPU (scripts/gpu_check.sh): per-sample SDPA in float32 as on the CPU (1e-4), and, when flash_attn is
    installed, its varlen kernels under bf16 autocast against the padded bf16 batch (per-sample losses, 2%)."""
    import importlib.util

    src, batch = _batch(tiny_ckpt, *dataset, order=[2, 1, 0])
    nll_pad, plan_pad, _ = _torch_run(src, batch, False, None, "cuda")
    nll_pack, plan_pack, _ = _torch_run(src, batch, True, None, "cuda")
    cu = plan_pack.cu_seqlens
    for b, n in enumerate(plan_pad.lengths):
        assert np.abs(nll_pack[0][cu[b]:cu[b + 1] - 1] - nll_pad[b][:n - 1]).max() < 1e-4, b
    if importlib.util.find_spec("flash_attn") is None:
        print("flash_attn not installed: varlen kernels not checked")
        return
    nll_pad, _, _ = _torch_run(src, batch, False, None, "cuda", bf16=True)
    nll_flash, _, _ = _torch_run(src, batch, True, None, "cuda", flash=True, bf16=True)
    for b, n in enumerate(plan_pad.lengths):
        a, c = nll_flash[0][cu[b]:cu[b + 1] - 1].sum(), nll_pad[b][:n - 1].sum()
        assert abs(a - c) <= 2e-2 * abs(c), (b, a, c)
