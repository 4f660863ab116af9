"""The torch training loop on tiny models: loss, accumulation, stage 1 freezing, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from train_helpers import read_losses, write_dataset

from conftest import requires_torch
from parrot.storage.safetensors_io import CheckpointFiles, SafetensorsFile
from parrot.training.config import TrainConfig
from parrot.training.data import LlavaData

pytestmark = requires_torch

IGNORE, IMAGE = -100, -200


def _train(tmp_path, name, model, data, image_dir, stop_after=None, **kw):
    from parrot.training import train

    args = dict(stage=2, data=str(data), image_dir=str(image_dir), output=str(tmp_path / name), model=str(model),
                backend="cpu", batch_size=2, grad_accum=1, num_workers=0)
    args.update(kw)
    return train(TrainConfig(**args), stop_after=stop_after, progress=False)


def _weights(directory) -> dict[str, np.ndarray]:
    f = CheckpointFiles(directory)
    return {k: f.read(k) for k in f.keys()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n=8)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _moe_float64(w: dict[str, np.ndarray], text: np.ndarray, hv: np.ndarray, n_experts: int, moe_weight: float):
    """docs/architecture.md, "Model facts" (3), in float64: routing from the CLS token over the text context."""
    C = hv.shape[-1]
    s = hv[0] @ text.T / np.sqrt(C)
    a = np.exp(s - s.max())
    a = (a / a.sum()) @ text
    g = a @ w["model.moe_model.gate.weight"].T
    p = np.exp(g - g.max())
    p /= p.sum()
    out = moe_weight * hv
    for i in range(n_experts):
        e = f"model.moe_model.experts.{i}."
        x1, x3 = hv @ w[e + "gate_proj.weight"].T, hv @ w[e + "up_proj.weight"].T
        out = out + p[i] * ((x1 / (1 + np.exp(-x1)) * x3) @ w[e + "down_proj.weight"].T)
    return out


def test_first_step_loss_equals_a_hand_computation_from_logits(tmp_path, tiny_ckpt, dataset):
    import torch

    import parrot

    data_path, image_dir = dataset
    samples = json.loads(data_path.read_text())
    one_batch = tmp_path / "two.json"
    one_batch.write_text(json.dumps([samples[2], samples[1]]))  # multi-turn image sample + text-only sample
    out = _train(tmp_path, "run", tiny_ckpt, one_batch, image_dir, max_steps=1)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])

    m = parrot.load(tiny_ckpt, backend="cpu")
    w = {k: v.astype(np.float64) for k, v in _weights(tiny_ckpt).items()}
    data = LlavaData(one_batch, image_dir, m.tokenizer, m.image_settings, m.num_visual_tokens)
    nll, count = 0.0, 0
    for i in range(2):
        item = data.item(i)
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        if item["has_image"]:
            # training MoE context: the embeddings of the text tokens whose label is ignored (not the answers)
            ctx = [t for t, lab in zip(ids, labels) if lab == IGNORE and t != IMAGE]
            text = w["model.embed_tokens.weight"][ctx]
            hv = m.image_features(m.preprocess(image_dir / samples[2]["image"]))[0].double().numpy()
            gv = _moe_float64(w, text, hv, m.config.num_experts, m.config.moe_weight)
            k = ids.index(IMAGE)
            embed = w["model.embed_tokens.weight"]
            emb = np.concatenate([embed[ids[:k]], gv, embed[ids[k + 1:]]])
            logits = m.forward_embeddings(torch.from_numpy(emb[None]).float())[0].double().numpy()
            labels = labels[:k] + [IGNORE] * m.num_visual_tokens + labels[k + 1:]
        else:
            logits = m.logits(ids).astype(np.float64)
        lp = _log_softmax(logits)
        for t in range(len(labels) - 1):
            if labels[t + 1] != IGNORE:
                nll -= lp[t, labels[t + 1]]
                count += 1
    assert row["step"] == 1 and row["num_label_tokens"] == count
    assert abs(row["loss"] - nll / count) < 1e-5, (row["loss"], nll / count)


def test_grad_accumulation_gives_the_same_losses_as_one_big_batch(tmp_path, tiny_ckpt, dataset):
    data_path, image_dir = dataset
    common = dict(max_steps=3, lr=3e-3, warmup_ratio=0.0)
    runs = {
        "4x1": _train(tmp_path, "a", tiny_ckpt, data_path, image_dir, batch_size=4, grad_accum=1, **common),
        "1x4": _train(tmp_path, "b", tiny_ckpt, data_path, image_dir, batch_size=1, grad_accum=4, **common),
        "2x2": _train(tmp_path, "c", tiny_ckpt, data_path, image_dir, batch_size=2, grad_accum=2,
                      gradient_checkpointing=False, **common),
    }
    losses = {k: read_losses(v) for k, v in runs.items()}
    assert len(losses["4x1"]) == 3 and losses["4x1"][0] != losses["4x1"][2]
    np.testing.assert_allclose(losses["1x4"], losses["4x1"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(losses["2x2"], losses["4x1"], rtol=1e-6, atol=0)
    # weights: Adam divides by sqrt(v), so a gradient entry near 0 can flip on rounding; the bulk agrees tightly
    ref = _weights(runs["4x1"])
    for name in ("1x4", "2x2"):
        got = _weights(runs[name])
        diff = np.concatenate([np.abs(got[k] - ref[k]).ravel() for k in ref])
        assert diff.max() < 1e-4 and np.mean(diff < 1e-6) > 0.999, (name, diff.max(), np.mean(diff < 1e-6))


def test_resume_after_a_stop_reproduces_the_uninterrupted_run(tmp_path, tiny_ckpt, dataset):
    data_path, image_dir = dataset
    common = dict(max_steps=5, save_every=2, lr=3e-3, warmup_ratio=0.2, num_workers=1)
    full = _train(tmp_path, "full", tiny_ckpt, data_path, image_dir, **common)
    part = _train(tmp_path, "part", tiny_ckpt, data_path, image_dir, stop_after=3, **common)
    assert len(read_losses(part)) == 3 and not (part / "config.json").exists()  # step 3 was logged, not saved
    _train(tmp_path, "part", tiny_ckpt, data_path, image_dir, resume=True, **common)
    assert read_losses(part) == read_losses(full)  # exactly, steps 3-5 recomputed from the step-2 checkpoint
    a, b = _weights(full), _weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_stage1_changes_only_the_projector(tmp_path, tiny_ckpt, dataset, capsys):
    data_path, image_dir = dataset
    out = _train(tmp_path, "s1", tiny_ckpt, data_path, image_dir, stage=1, max_steps=2, lr=1e-2, warmup_ratio=0.0)
    assert "trainable parameters: 7,296 of" in capsys.readouterr().out  # the projector: 48*64+64 + 64*64+64
    before, after = _weights(tiny_ckpt), _weights(out)
    assert before.keys() == after.keys()  # CLIP's unused last layer is carried too
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    assert changed == sorted(k for k in before if k.startswith("model.mm_projector."))
    assert json.loads((out / "config.json").read_text())["use_moe"] is False  # stage 1 bypasses the MoE
    ckpt = SafetensorsFile(out / "checkpoints" / "step-00000002" / "model.safetensors")
    assert sorted(ckpt.tensors) == changed  # stage 1 checkpoints hold the trainable tensors only


def test_text_only_batches_still_run_vision_projector_and_moe(tiny_ckpt):
    """Every parameter that trains gets a gradient on every micro-step (no ZeRO-3 / FSDP hang)."""
    import torch

    import parrot
    from parrot.backends.torch_cuda.model import causal_lm_loss_sum

    m = parrot.load(tiny_ckpt, backend="cpu")
    model = m.model.train()
    model.requires_grad_(True)
    ids = m.encode_prompt("The quick brown fox?", has_image=False) + [5, 6, m.tokenizer.eos_id]
    labels = [IGNORE] * (len(ids) - 3) + ids[-3:]
    pixels = torch.zeros(1, 3, m.image_settings.crop_height, m.image_settings.crop_width)
    logits, s = model(torch.tensor([ids]), pixel_values=pixels, labels=torch.tensor([labels]))
    loss, n = causal_lm_loss_sum(logits, s.labels)
    loss.backward()
    assert int(n) == 3
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if ".moe_model." in name or ".mm_projector." in name or ".vision_tower." in name:
            assert not p.grad.any(), name  # in the graph, but the output is not spliced in
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_truncated_samples_train_with_the_label_count_the_data_computed(tmp_path, tiny_ckpt, dataset):
    """--truncate cuts after the visual tokens; the loop checks the model's label count against the data's."""
    data_path, image_dir = dataset
    out = _train(tmp_path, "t", tiny_ckpt, data_path, image_dir, max_steps=2, max_length=100, truncate=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((out / "data_report.json").read_text())
    assert report["truncated"] > 0 and len(rows) == 2
    assert report["kept"] == 8 and max(r["num_tokens"] for r in rows) <= 2 * 100


@pytest.mark.parametrize("stage, no_moe, train_vision, parts", [
    (1, False, False, {"mm_projector"}),
    (1, False, True, {"mm_projector", "vision_tower"}),
    (2, False, False, {"mm_projector", "moe_model", "llm"}),
    (2, True, False, {"mm_projector", "llm"}),
])
def test_trainable_sets_per_stage(tiny_ckpt, stage, no_moe, train_vision, parts):
    from parrot.backends.torch_cuda.train.build import build_model, set_trainable
    from parrot.training.source import open_source

    tc = TrainConfig(stage=stage, data="x", output="y", model=str(tiny_ckpt), no_moe=no_moe, train_vision=train_vision)
    src = open_source(tc)
    assert src.config.use_moe == (stage == 2 and not no_moe)
    model = build_model(src, "cpu", seed=0)
    set_trainable(model, stage, tc.use_moe, train_vision)
    got = {n.split(".")[1] if n.split(".")[1] in ("mm_projector", "moe_model", "vision_tower") else "llm"
           for n, p in model.named_parameters() if p.requires_grad}
    assert got == parts
