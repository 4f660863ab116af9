"""`--deepspeed FILE`: "auto" fields resolved from the run's flags exactly as transformers' Trainer
resolves them (HfTrainerDeepSpeedConfig is the reference), mismatches and bad files refused."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from parrot.errors import ParrotError
from parrot.training.ds_config import read_ds_config, resolve_ds_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

WITH_SECTIONS = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto"},
}


def _transformers_resolution(raw: dict, s: dict) -> dict:
    """transformers' own resolution, from TrainingArguments-like settings."""
    pytest.importorskip("accelerate")  # transformers' DeepSpeed integration needs it
    pytest.importorskip("deepspeed")
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    args = SimpleNamespace(
        world_size=s["world_size"], per_device_train_batch_size=s["batch_size"],
        gradient_accumulation_steps=s["grad_accum"], max_grad_norm=s["max_grad_norm"], learning_rate=s["lr"],
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=s["weight_decay"], save_on_each_node=False,
        fp16=s["dtype"] == "float16", fp16_full_eval=False, bf16=s["dtype"] == "bfloat16", bf16_full_eval=False,
        get_warmup_steps=lambda n: math.ceil(n * s["warmup_ratio"]),
    )
    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(raw))
    try:
        hf.trainer_config_process(args)
        model = SimpleNamespace(config=SimpleNamespace(hidden_size=s["hidden_size"]))
        hf.trainer_config_finalize(args, model, s["total_steps"])
        return hf.config
    finally:
        unset_hf_deepspeed_config()


def _ours(raw: dict, s: dict):
    return resolve_ds_config(
        raw, batch_size=s["batch_size"], grad_accum=s["grad_accum"], world_size=s["world_size"], lr=s["lr"],
        weight_decay=s["weight_decay"], max_grad_norm=s["max_grad_norm"], dtype=s["dtype"],
        hidden_size=s["hidden_size"], total_steps=s["total_steps"],
        warmup_steps=math.ceil(s["total_steps"] * s["warmup_ratio"]))


SETTINGS = [  # stage 2's recipe on 8 GPUs in bf16; stage 1's on 2 in fp32; fp16 with clipping 0.5
    dict(world_size=8, batch_size=4, grad_accum=4, max_grad_norm=1.0, lr=2e-5, weight_decay=0.0, dtype="bfloat16",
         hidden_size=4096, total_steps=1000, warmup_ratio=0.03),
    dict(world_size=2, batch_size=8, grad_accum=4, max_grad_norm=1.0, lr=1e-3, weight_decay=0.0, dtype="float32",
         hidden_size=64, total_steps=7, warmup_ratio=0.0),
    dict(world_size=3, batch_size=1, grad_accum=2, max_grad_norm=0.5, lr=3e-4, weight_decay=0.1, dtype="float16",
         hidden_size=896, total_steps=50, warmup_ratio=0.1),
]


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "sections"])
@pytest.mark.parametrize("s", SETTINGS, ids=["8gpu-bf16", "2proc-fp32", "3proc-fp16"])
def test_auto_fields_resolve_as_transformers_does(name, s):
    raw = WITH_SECTIONS if name == "sections" else read_ds_config(CONFIGS / name)
    ours = _ours(raw, s)
    assert ours.file == _transformers_resolution(raw, s)
    assert "auto" not in json.dumps(ours.file)
    assert ours.config["train_batch_size"] == s["world_size"] * s["batch_size"] * s["grad_accum"]
    # DeepSpeed gets Parrot's torch AdamW and schedule: the sections are checked, then left out
    assert "optimizer" not in ours.config and "scheduler" not in ours.config


def test_shipped_configs_are_the_official_recipe():
    z2, z3 = read_ds_config(CONFIGS / "zero2.json"), read_ds_config(CONFIGS / "zero3.json")
    assert z2["zero_optimization"]["stage"] == 2 and z3["zero_optimization"]["stage"] == 3
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    for cfg in (z2, z3):
        assert {cfg[k] for k in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                                 "gradient_clipping")} == {"auto"}
        assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto"


def test_values_that_contradict_the_flags_are_refused():
    raw = {**read_ds_config(CONFIGS / "zero2.json"), "train_micro_batch_size_per_gpu": 3, "gradient_clipping": 0.5}
    with pytest.raises(ParrotError) as e:
        _ours(raw, SETTINGS[1])
    msg = str(e.value)
    assert "train_micro_batch_size_per_gpu=3 but --batch-size gives 8" in msg
    assert "gradient_clipping=0.5 but --max-grad-norm gives 1.0" in msg and '"auto"' in msg
    bf16_on = {**read_ds_config(CONFIGS / "zero2.json"), "bf16": {"enabled": True}}
    with pytest.raises(ParrotError, match="bf16.enabled"):
        _ours(bf16_on, SETTINGS[1])  # fp32 run


def test_unsupported_optimizer_is_refused():
    raw = {**WITH_SECTIONS, "optimizer": {"type": "Lamb", "params": {"lr": "auto"}}}
    with pytest.raises(ParrotError, match="Lamb"):
        _ours(raw, SETTINGS[1])


@pytest.mark.parametrize("content, needle", [
    (None, "file not found"), ("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
    ('{"zero_optimization": {"stage": 5}}', "stage must be 0, 1, 2 or 3"),
])
def test_bad_config_files_fail_cleanly(tmp_path, content, needle):
    p = tmp_path / "ds.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(ParrotError, match=needle):
        read_ds_config(p)
