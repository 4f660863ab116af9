"""--report-to: TensorBoard event files and an offline Weights & Biases run hold what metrics.jsonl holds."""

from __future__ import annotations

import json

import pytest
from train_helpers import write_dataset

from conftest import assert_clean_failure, requires_torch, run_parrot_here
from parrot.errors import ParrotError
from parrot.training.config import TrainConfig

pytestmark = requires_torch
SERIES = ("loss", "lr", "grad_norm", "tokens_per_s")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n=6)


def _train(output, model, data, image_dir, **kw):
    from parrot.training import train

    return train(TrainConfig(stage=2, data=str(data), image_dir=str(image_dir), output=str(output), model=str(model),
                             backend="cpu", num_workers=0, batch_size=2, grad_accum=1, max_steps=3, warmup_ratio=0.5,
                             **kw), progress=False)


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_read_back_hold_the_logged_values(tmp_path, tiny_ckpt, dataset):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _train(tmp_path / "run", tiny_ckpt, *dataset, report_to="tensorboard")
    acc = EventAccumulator(str(out / "runs"))
    acc.Reload()
    rows = _metrics(out)
    assert len(rows) == 3
    for name in SERIES:
        events = acc.Scalars(f"train/{name}")
        assert [e.step for e in events] == [1, 2, 3]
        for e, row in zip(events, rows):
            assert e.value == pytest.approx(row[name], rel=1e-6, abs=1e-12), name  # float32 in the event file
    assert rows[1]["lr"] > 0 and rows[0]["loss"] > 0


def test_wandb_offline_run_holds_the_logged_values(tmp_path, tiny_ckpt, dataset, monkeypatch):
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = _train(tmp_path / "run", tiny_ckpt, *dataset, report_to="wandb")
    (path,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    store = datastore.DataStore()
    store.open_for_scan(str(path))
    history = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    rows = _metrics(out)
    assert [h["_step"] for h in history] == [1, 2, 3]
    for h, row in zip(history, rows):
        for name in SERIES:
            assert h[f"train/{name}"] == row[name], name


def test_report_to_a_missing_logger_fails_before_the_run(tmp_path, tiny_ckpt, dataset, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    data, images = dataset
    p = run_parrot_here("train", "--backend", "cpu", "--stage", "2", "--model", tiny_ckpt, "--data", data,
                        "--image-dir", images, "--output", tmp_path / "o", "--report-to", "tensorboard")
    assert_clean_failure(p, "--report-to tensorboard", "parrot-vlm[tensorboard]")
    assert not (tmp_path / "o").exists()


def test_qlora_without_bitsandbytes_fails_before_the_run(tmp_path, tiny_ckpt, dataset, monkeypatch):
    import sys

    from parrot import registry

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    real = registry.BACKENDS["cuda"]
    monkeypatch.setitem(registry.BACKENDS, "cuda", type(real)(**{**real.__dict__, "probe": None}))  # as if a GPU
    from parrot.training import train

    data, images = dataset
    tc = TrainConfig(stage=2, data=str(data), image_dir=str(images), output=str(tmp_path / "o"), model=str(tiny_ckpt),
                     backend="cuda", lora=True, quantize=4)
    with pytest.raises(ParrotError, match=r"bitsandbytes.*parrot-vlm\[qlora\]"):
        train(tc, progress=False)
    assert not (tmp_path / "o").exists()
