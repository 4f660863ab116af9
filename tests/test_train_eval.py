"""--eval-data / --eval-every / --eval-limit / --save-best: `parrot eval`'s scorer on the weights of the
running training, logged per dataset; the best checkpoint is kept."""

from __future__ import annotations

import json

import pytest
from eval_helpers import mcq_rows, write_tsv
from train_helpers import write_dataset

from conftest import BACKENDS, assert_clean_failure, run_parrot_here
from parrot.training.config import TrainConfig


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n=6)


@pytest.fixture(scope="module")
def tsvs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tsv")
    return [write_tsv(d / "MMMB_en.tsv", mcq_rows(4)), write_tsv(d / "mini_pt.tsv", mcq_rows(3, hint=False))]


def _train(output, backend, model, data, image_dir, **kw):
    from parrot.training import train

    s = dict(stage=2, data=str(data), image_dir=str(image_dir), output=str(output), model=str(model), backend=backend,
             num_workers=0, batch_size=2, grad_accum=1, lr=1e-3, warmup_ratio=0.0, max_steps=4, save_every=100)
    s.update(kw)
    return train(TrainConfig(**s), progress=False)


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # end to end through the CLI on both backends: make test runs it, make test-quick skips it
@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_during_training_logs_what_parrot_eval_gives_on_the_weights(tmp_path, tiny_ckpt, dataset, tsvs,
                                                                         backend):
    import parrot
    from parrot.eval import EvalSettings, evaluate, resolve_sources

    out = _train(tmp_path / "run", backend, tiny_ckpt, *dataset, eval_data=[str(t) for t in tsvs], eval_every=2,
                 eval_limit=2)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert not any(k.startswith("eval/") for r in (rows[0], rows[2]) for k in r)
    for r in (rows[1], rows[3]):
        accs = [r["eval/MMMB_en/accuracy"], r["eval/mini_pt/accuracy"]]
        assert all(0 <= a <= 1 for a in accs) and r["eval/accuracy"] == pytest.approx(sum(accs) / 2)
    summary = json.loads((out / "eval" / "step-00000004" / "summary.json").read_text())
    assert summary["datasets"]["MMMB_en"]["questions"] == 2  # --eval-limit
    # independently: the exported final weights, loaded and scored by `parrot eval` (the same step-4 weights)
    ref = evaluate(resolve_sources([str(t) for t in tsvs]), tmp_path / "ref", model=parrot.load(out, backend=backend),
                   settings=EvalSettings(limit=2, progress=False), echo=lambda m: None)
    for name in ("MMMB_en", "mini_pt"):
        assert rows[3][f"eval/{name}/accuracy"] == ref["datasets"][name]["overall"]
        answers = (out / "eval" / "step-00000004" / f"{name}.tsv").read_text()  # the same answers, word for word
        assert answers == (tmp_path / "ref" / f"{name}.tsv").read_text() and answers.count("\n\"") >= 2


def test_save_best_keeps_the_best_checkpoint_beside_the_newest(tmp_path, tiny_ckpt, dataset, tsvs):
    out = _train(tmp_path / "run", "cpu", tiny_ckpt, *dataset, eval_data=[str(tsvs[0])], eval_every=1, eval_limit=3,
                 save_best=True, save_every=1, save_total_limit=2, max_steps=5, lr=5e-3)
    accs = {r["step"]: r["eval/accuracy"] for r in _rows(out)}
    best = max(accs, key=lambda s: (accs[s], -s))  # the first step with the best accuracy
    kept = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert kept == sorted({best, 4, 5})
    state = json.loads((out / "checkpoints" / "step-00000005" / "trainer_state.json").read_text())
    assert state["best"] == {"step": best, "accuracy": accs[best]}


def test_eval_flags_fail_cleanly(tmp_path, tiny_ckpt, dataset):
    data, images = dataset
    common = ["train", "--backend", "cpu", "--stage", "2", "--model", tiny_ckpt, "--data", data, "--image-dir",
              images, "--output", tmp_path / "o"]
    p = run_parrot_here(*common, "--eval-data", tmp_path / "missing.tsv", "--eval-every", "2")
    assert_clean_failure(p, "missing.tsv")
    p = run_parrot_here(*common, "--save-best")
    assert_clean_failure(p, "--save-best", "--eval-data")
    assert not (tmp_path / "o").exists()


def test_a_stopped_run_with_evaluation_resumes_to_the_same_losses_and_scores(tmp_path, tiny_ckpt, dataset, tsvs):
    settings = dict(eval_data=[str(tsvs[1])], eval_every=2, eval_limit=2, save_every=1, max_steps=4)
    ref = _train(tmp_path / "ref", "cpu", tiny_ckpt, *dataset, **settings)
    from parrot.training import train

    out = tmp_path / "stopped"
    s = dict(stage=2, data=str(dataset[0]), image_dir=str(dataset[1]), output=str(out), model=str(tiny_ckpt),
             backend="cpu", num_workers=0, batch_size=2, grad_accum=1, lr=1e-3, warmup_ratio=0.0, **settings)
    train(TrainConfig(**s), stop_after=3, progress=False)
    train(TrainConfig(**s, resume=True), progress=False)
    a, b = _rows(ref), _rows(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4] and "eval/accuracy" in b[3]
    for x, y in zip(a, b, strict=True):
        x.pop("tokens_per_s"), y.pop("tokens_per_s")
        assert x == y
