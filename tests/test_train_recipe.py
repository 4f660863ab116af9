"""The official recipe's knobs on both backends: --mm-projector-lr / --moe-lr as optimizer parameter
groups, and --group-by-modality-length (LLaVA's modality-grouped sampler)."""

from __future__ import annotations

import numpy as np
import pytest
from train_helpers import read_losses, write_dataset

from conftest import requires_mlx, requires_torch
from parrot.training.config import TrainConfig

PROJ_LR, MOE_LR, LR = 3e-3, 7e-4, 1e-4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n=7)


def _settings(model, data, image_dir, **kw):
    s = dict(stage=2, data=str(data), image_dir=str(image_dir), model=str(model), num_workers=0, batch_size=2,
             grad_accum=1, lr=LR, warmup_ratio=0.0, max_steps=3)
    s.update(kw)
    return s


def _train_keeping(output, backend, attr, stop_after=None, **settings):
    """Trains; returns (output, the engine's `attr` at the end)."""
    from parrot.backends.mlx.train.loop import MLXEngine
    from parrot.backends.torch_cuda.train.loop import TorchEngine
    from parrot.training import train

    kept = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TorchEngine, "close", lambda self: kept.setdefault("x", getattr(self, attr)))
        mp.setattr(MLXEngine, "close", lambda self: kept.setdefault("x", getattr(self, attr)))
        out = train(TrainConfig(output=str(output), backend=backend, **settings), stop_after, progress=False)
    return out, kept["x"]


@requires_torch
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_projector_and_moe_lrs_are_the_optimizer_groups_lrs(tmp_path, tiny_ckpt, dataset, lora):
    from parrot.training.schedule import cosine_lr_factor

    settings = _settings(tiny_ckpt, *dataset, mm_projector_lr=PROJ_LR, moe_lr=MOE_LR, lora=lora, max_steps=4)
    out, strategy = _train_keeping(tmp_path / "run", "cpu", "strategy", stop_after=2, **settings)
    factor = cosine_lr_factor(2, 4, 0)  # the third step's schedule factor (0.5)
    name_of = {id(p): n for n, p in strategy.model.named_parameters()}
    seen = {}
    for g in strategy.optimizer.param_groups:
        for p in g["params"]:
            n = name_of[id(p)]
            want = PROJ_LR if ".mm_projector." in n else MOE_LR if ".moe_model." in n else LR
            assert g["lr"] == pytest.approx(want * factor, rel=1e-12), n
            assert g["initial_lr"] == want, n
            seen[want] = seen.get(want, 0) + 1
    assert set(seen) == {PROJ_LR, MOE_LR, LR} and seen[PROJ_LR] == 4 and seen[MOE_LR] == 1 + 6 * 3
    assert len(read_losses(out)) == 2


@requires_torch
@requires_mlx
def test_module_lrs_apply_the_same_on_both_backends(tmp_path, tiny_ckpt, dataset):
    settings = _settings(tiny_ckpt, *dataset, mm_projector_lr=PROJ_LR, moe_lr=MOE_LR)
    a, _ = _train_keeping(tmp_path / "cpu", "cpu", "p", **settings)
    b, opt = _train_keeping(tmp_path / "mlx", "mlx", "optimizer", **settings)
    np.testing.assert_allclose(read_losses(a), read_losses(b), rtol=1e-4)
    from parrot.training.schedule import cosine_lr_factor

    f = cosine_lr_factor(2, 3, 0)
    assert opt.lr_of("mm_projector.2.weight") == pytest.approx(PROJ_LR * f)
    assert opt.lr_of("moe_model.experts.3.up_proj.weight") == pytest.approx(MOE_LR * f)
    assert opt.lr_of("language_model.model.layers.0.mlp.up_proj.weight") == pytest.approx(LR * f)
    plain = _train_keeping(tmp_path / "plain", "mlx", "p", **_settings(tiny_ckpt, *dataset))[0]
    assert abs(read_losses(plain)[-1] - read_losses(b)[-1]) > 1e-4  # the groups' lrs changed the trajectory


# ---------------------------------------------------------------- --group-by-modality-length
def _grouped_plan(n=23, batch=2, accum=2, world=1, seed=5, max_steps=None, epochs=2):
    from parrot.training.schedule import StepPlan

    rng = np.random.default_rng(0)
    modality = [bool(x) for x in rng.random(n) < 0.6]
    lengths = rng.integers(10, 500, n).tolist()
    return StepPlan(n, batch, accum, seed, epochs, max_steps, world, modality, lengths), modality, lengths


def test_modality_grouped_batches_hold_one_modality_and_cover_every_sample_once_per_epoch():
    plan, modality, lengths = _grouped_plan()
    g = plan.global_batch
    n_image = sum(modality)
    assert plan.steps_per_epoch == -(-n_image // g) + -(-(23 - n_image) // g)
    for epoch in range(2):
        steps = range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch)
        batches = [plan.global_batch_at(s) for s in steps]
        assert sorted(i for b in batches for i in b) == list(range(23))  # every sample once
        for b in batches:
            assert len({modality[i] for i in b}) == 1, b  # one modality each
            assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)  # similar lengths
            assert 0 < len(b) <= g
        assert sum(len(b) < g for b in batches) <= 2  # only each modality's remainder is smaller
        micro = [i for s in steps for mb in plan.micro_batches(s) for i in mb]
        assert sorted(micro) == list(range(23))
    a = [plan.global_batch_at(s) for s in range(plan.steps_per_epoch)]
    b = [plan.global_batch_at(s) for s in range(plan.steps_per_epoch, 2 * plan.steps_per_epoch)]
    assert a != b  # a fresh layout per epoch


def test_modality_grouped_plan_is_a_function_of_the_step():
    plan, *_ = _grouped_plan()
    fresh, *_ = _grouped_plan()
    for s in reversed(range(plan.total_steps)):  # another object, visited in another order: same batches
        assert fresh.global_batch_at(s) == plan.global_batch_at(s)
    by4 = _grouped_plan(batch=4, accum=1)[0]
    split = _grouped_plan(batch=1, accum=2, world=2)[0]
    for s in range(plan.total_steps):
        assert by4.global_batch_at(s) == split.global_batch_at(s) == plan.global_batch_at(s)
    assert sum(len(split.micro_batches(s, r)[0]) for r in range(2) for s in range(1)) >= 2


@requires_torch
@requires_mlx
def test_grouped_runs_agree_across_backends_and_resume_exactly(tmp_path, tiny_ckpt, dataset):
    import json

    from parrot.training import train

    settings = _settings(tiny_ckpt, *dataset, group_by_modality_length=True, max_steps=4, save_every=1, lr=1e-3)
    a, _ = _train_keeping(tmp_path / "cpu", "cpu", "p", **settings)
    b, _ = _train_keeping(tmp_path / "mlx", "mlx", "p", **settings)
    np.testing.assert_allclose(read_losses(a), read_losses(b), rtol=1e-4)
    rows = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    # 7 samples, batch 2: 5 with an image (3 steps), 2 text-only (1 step); the text-only step has no visual
    # tokens, so by far the fewest tokens (a mixed batch would hold at least one image's)
    tokens = sorted(r["num_tokens"] for r in rows)
    assert tokens[0] < 0.5 * tokens[1], tokens
    stopped = tmp_path / "stopped"
    train(TrainConfig(output=str(stopped), backend="cpu", **settings), stop_after=2, progress=False)
    train(TrainConfig(output=str(stopped), backend="cpu", resume=True, **settings), progress=False)
    assert read_losses(stopped) == read_losses(a)
