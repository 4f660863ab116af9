"""Fuzzing the JSON settings files: a model's config.json, a CLIP tower's config.json,
preprocessor_config.json, adapter_config.json and a run's run_config.json. Whatever the bytes, the
loader returns or raises ParrotError (see tests/fuzz.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fuzz import FUZZ, cases, dumps, json_input, mutate_json, only_parrot_errors, random_json, write
from hypothesis import given
from PIL import Image

from parrot.model.checkpoint import Checkpoint
from parrot.model.config import ParrotConfig
from parrot.model.image import ImageSettings, preprocess
from parrot.model.schema import PARROT_CONFIG, PREPROCESSOR, TRAIN_CONFIG, VISION_CONFIG
from parrot.storage.safetensors_io import save_file
from parrot.training.adapter import read_adapter
from parrot.training.config import TrainConfig
from parrot.training.prepare import _check_resume

TOWER = "clip-vit-tiny"
PHOTO = Image.fromarray(np.random.default_rng(0).integers(0, 255, (9, 13, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_ckpt) -> Path:
    """A private copy of the tiny checkpoint whose JSON files the tests overwrite."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path_factory.mktemp("fuzz-config") / "model"))


@pytest.fixture(scope="module")
def originals(tiny_ckpt) -> dict[str, dict]:
    return {name: json.loads((tiny_ckpt / name).read_text())
            for name in ("config.json", f"{TOWER}/config.json", f"{TOWER}/preprocessor_config.json")}


@FUZZ(2000)
@given(r=cases())
def test_config_json_raises_only_parrot_errors(model, originals, r):
    write(model / "config.json", json_input(r, originals["config.json"], sorted(PARROT_CONFIG.fields)))
    cfg = only_parrot_errors("config.json (ParrotConfig.from_file)", ParrotConfig.from_file, model)
    if cfg is not None:  # what loads is usable: the derived numbers and the round trip work
        assert cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size
        assert cfg.projector_depth >= 1
        assert ParrotConfig.from_dict(cfg.to_dict("mlx")).to_dict("mlx") == cfg.to_dict("mlx")


@FUZZ(600)
@given(r=cases())
def test_checkpoint_open_raises_only_parrot_errors(model, originals, r):
    """config.json, the tower's config.json or its preprocessor_config.json mutated, then the whole open
    (tower resolution, manifest, shapes against the weights)."""
    name = r.choice(sorted(originals))
    keys = {"config.json": PARROT_CONFIG, f"{TOWER}/config.json": VISION_CONFIG}.get(name, PREPROCESSOR).fields
    for other, valid in originals.items():
        write(model / other, dumps(valid) if other != name else json_input(r, valid, sorted(keys)))
    ckpt = only_parrot_errors("model directory (Checkpoint.open)", Checkpoint.open, model)
    if ckpt is not None:
        s = ckpt.tower.image
        assert min(s.crop_height, s.crop_width, s.shortest_edge) >= 1


@FUZZ(2000)
@given(r=cases())
def test_preprocessor_config_raises_only_parrot_errors(tmp_path_factory, originals, r):
    path = write(tmp_path_factory.getbasetemp() / "fuzz_preprocessor_config.json",
                 json_input(r, originals[f"{TOWER}/preprocessor_config.json"], sorted(PREPROCESSOR.fields)))
    s = only_parrot_errors("preprocessor_config.json (ImageSettings)", ImageSettings.from_file, path)
    if s is not None:  # settings that load preprocess an image
        assert all(0 <= m <= 1 for m in s.image_mean) and min(s.image_std) > 0
        with np.errstate(all="ignore"):  # a huge rescale_factor overflows to inf: odd, not an error
            x = preprocess(PHOTO, s)
        assert x.shape == (1, 3, s.crop_height, s.crop_width)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz-adapter")
    m = "language_model.model.layers.0.self_attn.q_proj"
    save_file({f"{m}.lora_a": np.zeros((64, 8), np.float32), f"{m}.lora_b": np.zeros((8, 64), np.float32)},
              d / "adapters.safetensors")
    return d


ADAPTER = {"fine_tune_type": "lora", "model": "m", "num_layers": 2,
           "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]},
           "parrot": {"format": 1, "alpha": None, "targets": ["q_proj"], "modules": [], "use_moe": True,
                      "base": {"hidden_size": 64, "num_experts": 6}, "base_quantization": None}}


@FUZZ(2000)
@given(r=cases())
def test_adapter_config_raises_only_parrot_errors(adapter_dir, r):
    write(adapter_dir / "adapter_config.json", json_input(r, ADAPTER))
    a = only_parrot_errors("adapter_config.json (read_adapter)", read_adapter, adapter_dir)
    if a is not None:
        assert a.rank == 8 and isinstance(a.base, dict) and a.use_moe in (True, False, None)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, TrainConfig, dict]:
    root = tmp_path_factory.mktemp("fuzz-run")
    tc = TrainConfig(stage=2, data=str(root / "d.json"), output=str(root / "run"), model="m", backend="cpu")
    tc = tc.resolved()
    latest = root / "run" / "checkpoints" / "step-00000001"
    latest.mkdir(parents=True)
    return latest, tc, {"config": tc.to_dict(), "derived": {"world_size": 1, "total_steps": 10}}


@FUZZ(2000)
@given(r=cases())
def test_run_config_on_resume_raises_only_parrot_errors(run_dir, r):
    latest, tc, valid = run_dir
    if r.random() < 0.3:
        raw = json_input(r, valid)
    else:
        raw = dumps({**valid, "config": mutate_json(r, valid["config"], sorted(TRAIN_CONFIG.fields))})
    write(latest / "run_config.json", raw)
    only_parrot_errors("run_config.json (--resume)", _check_resume, tc, latest, 1)


@FUZZ(150)
@given(r=cases())
def test_any_json_value_in_a_field_is_accepted_or_named(model, originals, r):
    """Fields in turn get an arbitrary JSON value: accepted, or an error naming that field."""
    value = random_json(r)
    for key in ("hidden_size", "rope_theta", "use_moe", "vision_config", "mm_projector_type", "quantization"):
        write(model / "config.json", dumps({**originals["config.json"], key: value}))
        try:
            ParrotConfig.from_file(model)
        except Exception as e:  # noqa: BLE001  (the assertion below says which)
            assert type(e).__name__ == "ParrotError" and key in str(e), f"{key}={value!r}: {e!r}"


ODD_VALUES = [None, True, 0, -1, 3, 2**31, 1e300, float("nan"), "", "x", [], {}, [1], {"x": 1}]


def test_every_field_with_every_odd_value_opens_or_fails_cleanly(model, originals):
    """Not random: each field of config.json, the tower's config.json and preprocessor_config.json in
    turn gets each odd value, then the whole model directory is opened."""
    tables = {"config.json": PARROT_CONFIG, f"{TOWER}/config.json": VISION_CONFIG,
              f"{TOWER}/preprocessor_config.json": PREPROCESSOR}
    for name, table in tables.items():
        for key in sorted(table.fields):
            for value in ODD_VALUES:
                for other, valid in originals.items():
                    write(model / other, dumps({**valid, key: value} if other == name else valid))
                only_parrot_errors("model directory: every field x odd values", Checkpoint.open, model)


def test_every_adapter_and_run_config_field_with_every_odd_value_fails_cleanly(adapter_dir, run_dir):
    latest, tc, valid_run = run_dir
    for key in sorted(TRAIN_CONFIG.fields):
        for value in ODD_VALUES:
            write(latest / "run_config.json", dumps({**valid_run, "config": {**valid_run["config"], key: value}}))
            only_parrot_errors("run_config.json: every field x odd values", _check_resume, tc, latest, 1)
    for part in ("top", "lora_parameters", "parrot"):
        for key in sorted({**ADAPTER, **ADAPTER["lora_parameters"], **ADAPTER["parrot"]}):
            for value in ODD_VALUES:
                cfg = json.loads(json.dumps(ADAPTER))
                (cfg if part == "top" else cfg[part])[key] = value
                write(adapter_dir / "adapter_config.json", dumps(cfg))
                only_parrot_errors("adapter_config.json: every field x odd values", read_adapter, adapter_dir)
