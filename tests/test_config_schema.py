"""Config files checked by schema (parrot_core/model/schema.py): every field read from config.json, a CLIP
tower's config.json, preprocessor_config.json, run_config.json and adapter_config.json has a rule, and a
wrong value gives one ParrotError naming the file, the field, the value and what is expected."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from parrot.errors import ParrotError
from parrot.model.checkpoint import Checkpoint
from parrot.model.config import ParrotConfig, VisionConfig
from parrot.model.image import ImageSettings
from parrot.model.schema import ADAPTER_CONFIG, PARROT_CONFIG, TRAIN_CONFIG, VISION_CONFIG
from parrot.storage.safetensors_io import INDEX_NAME, CheckpointFiles, save_file
from parrot.testing import write_tiny_clip, write_tiny_llm
from parrot.training.adapter import read_adapter
from parrot.training.config import TrainConfig
from parrot.training.data import read_llava_json
from parrot.training.source import open_source

# AIDC-AI/Parrot-7B's config.json as released (transformers 4.39, Qwen1.5-7B-Chat base)
OFFICIAL_7B = {
    "architectures": ["ParrotQwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "freeze_mm_mlp_adapter": False, "hidden_act": "silu", "hidden_size": 4096,
    "image_aspect_ratio": "pad", "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 32768, "max_window_layers": 28, "mm_hidden_size": 1024, "mm_patch_merge_type": "flat",
    "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False, "mm_vision_select_feature": "cls_patch", "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "model_type": "parrot_qwen2", "moe_hidden_size": 4096,
    "moe_intermediate_size": 4096, "moe_top_k": 6, "moe_weight": 0.1, "num_attention_heads": 32, "num_experts": 6,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": False, "tokenizer_model_max_length": 2048,
    "tokenizer_padding_side": "right", "torch_dtype": "bfloat16", "transformers_version": "4.39.2",
    "tune_mm_mlp_adapter": False, "use_cache": True, "use_mm_proj": True, "use_moe": True, "use_moe_residual": True,
    "use_sliding_window": False, "vocab_size": 151936,
}


def test_official_config_is_accepted_and_round_trips():
    cfg = ParrotConfig.from_dict(OFFICIAL_7B)
    assert cfg.to_dict() == {**OFFICIAL_7B, "rope_scaling": None}  # written explicitly, as before
    assert (cfg.head_dim, cfg.projector_depth, cfg.moe_weight) == (128, 2, 0.1)


def test_every_field_read_has_a_rule():
    parrot = {f.name for f in dataclasses.fields(ParrotConfig)} - {"extra"}
    assert parrot <= PARROT_CONFIG.fields.keys()
    assert {f.name for f in dataclasses.fields(VisionConfig)} <= VISION_CONFIG.fields.keys()
    assert {f.name for f in dataclasses.fields(TrainConfig)} == TRAIN_CONFIG.fields.keys()
    assert {"lora_parameters", "parrot", "fine_tune_type"} <= ADAPTER_CONFIG.fields.keys()


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", "sixty-four", 'hidden_size is "sixty-four" (a string); expected a positive integer'),
    ("hidden_size", True, "hidden_size is true (a boolean); expected a positive integer"),
    ("hidden_size", 64.0, "hidden_size is 64.0 (a number); expected a positive integer"),
    ("vocab_size", 2**40, "vocab_size is 1099511627776; expected a positive integer of at most 2147483647"),
    ("num_hidden_layers", 10**6, "num_hidden_layers is 1000000; expected a positive integer of at most 4096"),
    ("rope_scaling", {"rope_type": "nope", "factor": 2}, 'rope_scaling.rope_type is "nope"; expected one of'),
    ("rope_scaling", {"type": "yarn"}, "rope_scaling.factor is missing; expected a positive number"),
    ("rms_norm_eps", 0, "rms_norm_eps is 0; expected a positive number"),
    ("rope_theta", float("inf"), "rope_theta is Infinity; expected a positive number or null"),
    ("moe_weight", True, "moe_weight is true (a boolean); expected a finite number"),
    ("rope_scaling", [1], "rope_scaling is [1] (a list); expected an object or null"),
    ("use_moe_residual", "false", 'use_moe_residual is "false" (a string); expected true or false'),
    ("mm_vision_select_feature", "cls", 'mm_vision_select_feature is "cls"; expected one of "cls_patch", "patch"'),
    ("mm_projector_type", "mlp0x_gelu", "mm_projector_type is \"mlp0x_gelu\"; expected 'mlp2x_gelu' or another"),
    ("quantization", {"group_size": 64, "bits": 7}, "quantization.bits is 7; expected one of 2, 3, 4, 5, 6, 8"),
    ("vision_config", {"patch_size": 0}, "vision_config.patch_size is 0; expected a positive integer"),
    ("num_key_value_heads", 3, "num_attention_heads 32 is not divisible by num_key_value_heads 3"),
    ("moe_hidden_size", 2048, "moe_hidden_size 2048 must equal hidden_size 4096"),
])
def test_a_wrong_field_is_named_with_its_value_and_what_is_expected(field, value, message):
    with pytest.raises(ParrotError) as e:
        ParrotConfig.from_dict({**OFFICIAL_7B, field: value}, source="parrot/config.json")
    assert str(e.value).startswith(f"parrot/config.json: {message}"), str(e.value)


def test_unknown_keys_stay_unchecked_in_extra():
    raw = {**OFFICIAL_7B, "my_note": [1, {"x": None}], "mm_use_im_start_end": "whatever"}
    cfg = ParrotConfig.from_dict(raw)
    assert cfg.extra["my_note"] == [1, {"x": None}] and cfg.to_dict() == {**raw, "rope_scaling": None}


def test_nested_vision_config_relations_are_checked():
    with pytest.raises(ParrotError, match="vision_config.patch_size 14 is larger than vision_config.image_size 7"):
        ParrotConfig.from_dict({**OFFICIAL_7B, "vision_config": {"image_size": 7}})


def test_a_clip_tower_config_is_checked_by_name(tmp_path, tiny_ckpt):
    model = Path(shutil.copytree(tiny_ckpt, tmp_path / "m"))
    path = model / "clip-vit-tiny" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "layer_norm_eps": "1e-5"}))
    with pytest.raises(ParrotError, match=r'clip-vit-tiny/config.json: layer_norm_eps is "1e-5" \(a string\)'):
        Checkpoint.open(model)
    path.write_text("[1, 2]")
    with pytest.raises(ParrotError, match="clip-vit-tiny/config.json: expected a JSON object"):
        Checkpoint.open(model)


@pytest.mark.parametrize("name", ["a" * 5000, "x/" * 3000, "a\x00b", None])
def test_an_unresolvable_tower_name_is_a_clear_error(tmp_path, tiny_ckpt, name):
    """Names the file system cannot hold (too long, NUL) used to end in OSError; no name at all is the
    same clear error."""
    model = Path(shutil.copytree(tiny_ckpt, tmp_path / "m"))
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "mm_vision_tower": name}))
    with pytest.raises(ParrotError, match="mm_vision_tower .* does not resolve") as e:
        Checkpoint.open(model)
    assert len(str(e.value)) < 1000


@pytest.mark.parametrize("change, message", [
    ({"do_resize": "yes"}, 'do_resize is "yes" (a string); expected true or false'),
    ({"image_mean": [0.5, 0.5]}, "image_mean is [0.5, 0.5]; expected a list of 3 numbers in [0, 1]"),
    ({"image_mean": [0.5, 0.5, 1e300]}, "image_mean[2] is 1e+300; expected a number in [0, 1]"),
    ({"image_std": [0.2, 0, 0.2]}, "image_std[1] is 0; expected a positive number"),
    ({"resample": 9}, "resample is 9; expected a PIL resampling filter"),
    ({"crop_size": {"height": 336}}, "crop_size.width is missing"),
    ({"size": {"longest_edge": 336}}, "size is {\"longest_edge\": 336}; expected an object with shortest_edge"),
    ({"crop_size": 100_000}, "crop_size is 100000; expected a positive integer up to 2048"),
])
def test_preprocessor_settings_are_checked(change, message):
    valid = ImageSettings().to_dict()
    with pytest.raises(ParrotError) as e:
        ImageSettings.from_dict({**valid, **change}, source="preprocessor_config.json")
    assert str(e.value).startswith(f"preprocessor_config.json: {message}"), str(e.value)
    assert ImageSettings.from_dict(valid) == ImageSettings()


@pytest.mark.parametrize("change, needle", [
    ({"lr": "fast"}, 'lr is "fast" (a string); expected a number >= 0 or null'),
    ({"stage": 3}, "stage is 3; expected one of 1, 2"),
    ({"lora_targets": "q_proj"}, 'lora_targets is "q_proj" (a string); expected a list (each a string) or null'),
    ({"warmup_ratio": 1.0}, "warmup_ratio is 1.0; expected a number in [0, 1)"),
    ({"resume": 1}, "resume is 1 (an integer); expected true or false"),
    ({"data": None}, "data is null; expected a string"),
])
def test_train_config_from_dict_checks_fields(change, needle):
    d = TrainConfig(stage=2, data="d.json", output="out", model="m").to_dict()
    with pytest.raises(ParrotError) as e:
        TrainConfig.from_dict({**d, **change}, "run_config.json")
    assert str(e.value) == f"run_config.json: {needle}"
    assert TrainConfig.from_dict(d) == TrainConfig(stage=2, data="d.json", output="out", model="m")


@pytest.mark.parametrize("cfg, needle", [
    ({"fine_tune_type": "lora", "lora_parameters": {"rank": "8", "scale": 20.0}},
     'lora_parameters.rank is "8" (a string); expected a positive integer'),
    ({"lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 1.5}}, "lora_parameters.dropout is 1.5"),
    ({"lora_parameters": {"rank": 8}}, "lora_parameters.scale is missing; expected a finite number"),
    ({"lora_parameters": {"rank": 8, "scale": 1.0}, "parrot": []}, "parrot is [] (a list); expected an object"),
    ({"lora_parameters": {"rank": 8, "scale": 1.0}, "parrot": {"base": {"hidden_size": "64"}}},
     'parrot.base.hidden_size is "64" (a string)'),
    ({"lora_parameters": {"rank": 8, "scale": 1.0}, "parrot": {"use_moe": "no"}}, "parrot.use_moe is \"no\""),
])
def test_adapter_config_fields_are_checked(tmp_path, cfg, needle):
    m = "language_model.model.layers.0.self_attn.q_proj"
    save_file({f"{m}.lora_a": np.zeros((64, 8), np.float32), f"{m}.lora_b": np.zeros((8, 64), np.float32)},
              tmp_path / "adapters.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ParrotError, match="adapter_config.json: ") as e:
        read_adapter(tmp_path)
    assert needle in str(e.value)


def test_a_new_models_llm_config_is_checked(tmp_path):
    llm, clip = write_tiny_llm(tmp_path / "llm"), write_tiny_clip(tmp_path / "clip")
    cfg = json.loads((llm / "config.json").read_text())
    (llm / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 0}))
    tc = TrainConfig(stage=1, data="d.json", output="o", llm=str(llm), vision_tower=str(clip))
    with pytest.raises(ParrotError, match=r"llm/config.json: num_key_value_heads is 0; expected a positive integer"):
        open_source(tc)


def test_json_nested_too_deeply_is_refused_by_every_json_reader(tmp_path, tiny_ckpt):
    """Nesting deeper than Python's recursion limit used to escape as RecursionError."""
    deep = "[" * 5000 + "]" * 5000
    model = Path(shutil.copytree(tiny_ckpt, tmp_path / "m"))
    (model / "config.json").write_text(deep)
    (tmp_path / "data.json").write_text(deep)
    (tmp_path / "pre.json").write_text(deep)
    readers = [(ParrotConfig.from_file, model), (read_llava_json, tmp_path / "data.json"),
               (ImageSettings.from_file, tmp_path / "pre.json")]
    (model / INDEX_NAME).write_text(json.dumps({"weight_map": {"x": json.loads("[" * 100 + "]" * 100)}}))
    readers.append((CheckpointFiles, model))
    for read, path in readers:
        with pytest.raises(ParrotError, match="nested more than 64 levels deep|not valid JSON"):
            read(path)
