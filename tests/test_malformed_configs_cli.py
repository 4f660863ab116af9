"""Malformed config files through `parrot chat`, `parrot convert` and `parrot train` (in-process, through
`parrot.cli.main.main`): each exits 1 with one line `Error: ...` naming the field at fault, no traceback,
and writes nothing (convert's DST and train's --output stay absent). Issue 12 measured 17 tracebacks in
39 such runs (`"hidden_size": "sixty-four"` -> TypeError, `num_attention_heads: 0` -> ZeroDivisionError)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import requires_torch
from parrot.cli.main import main
from parrot.training.config import TrainConfig

TOWER = "clip-vit-tiny"  # the tiny checkpoint's CLIP tower directory

# (id, file inside the checkpoint, change to its JSON (a dict -> merged; a callable -> applied; a str ->
# the file's raw text), what the one-line error must name)
CASES = [
    ("hidden-size-string", "config.json", {"hidden_size": "sixty-four"}, 'hidden_size is "sixty-four" (a string)'),
    ("heads-zero", "config.json", {"num_attention_heads": 0}, "num_attention_heads is 0; expected a positive"),
    ("hidden-size-negative", "config.json", {"hidden_size": -64}, "hidden_size is -64"),
    ("layers-zero", "config.json", {"num_hidden_layers": 0}, "num_hidden_layers is 0"),
    ("heads-not-dividing", "config.json", {"num_attention_heads": 5}, "not divisible by num_attention_heads 5"),
    ("gqa-not-dividing", "config.json", {"num_key_value_heads": 3}, "not divisible by num_key_value_heads 3"),
    ("unknown-projector", "config.json", {"mm_projector_type": "mlp2x_relu"}, "mm_projector_type"),
    ("list-not-object", "config.json", lambda c: [c], "expected a JSON object"),
    ("list-for-number", "config.json", {"rope_theta": [1e6]}, "rope_theta is [1000000.0] (a list)"),
    ("invalid-json", "config.json", '{"model_type": "parrot_qwen2",', "not valid JSON"),
    ("use-moe-yes", "config.json", {"use_moe": "yes"}, 'use_moe is "yes" (a string); expected true or false'),
    ("rms-eps-negative", "config.json", {"rms_norm_eps": -1}, "rms_norm_eps is -1; expected a positive number"),
    ("vocab-null", "config.json", {"vocab_size": None}, "vocab_size is null"),
    ("moe-weight-string", "config.json", {"moe_weight": "0.1"}, "moe_weight"),
    ("dtype-unknown", "config.json", {"torch_dtype": "float64"}, "torch_dtype"),
    ("select-layer-float", "config.json", {"mm_vision_select_layer": -2.5}, "mm_vision_select_layer"),
    ("select-layer-out-of-range", "config.json", {"mm_vision_select_layer": -9}, "mm_vision_select_layer is -9"),
    ("nested-vision-config-wrong", "config.json", {"vision_config": {"hidden_size": "big"}},
     "vision_config.hidden_size"),
    ("nested-vision-config-list", "config.json", {"vision_config": [48, 4]}, "vision_config is [48, 4] (a list)"),
    ("tower-heads-not-dividing", f"{TOWER}/config.json", {"num_attention_heads": 5},
     "hidden_size 48 is not divisible by num_attention_heads 5"),
    ("tower-act-unknown", f"{TOWER}/config.json", {"hidden_act": "relu"}, "hidden_act"),
    ("preprocessor-crop-negative", f"{TOWER}/preprocessor_config.json", {"crop_size": -1}, "crop_size is -1"),
    ("preprocessor-std-zero", f"{TOWER}/preprocessor_config.json", {"image_std": [0, 1, 1]}, "image_std[0] is 0"),
]


def damage(ckpt: Path, name: str, change) -> None:
    path = ckpt / name
    if isinstance(change, str):
        path.write_text(change)
        return
    cfg = json.loads(path.read_text())
    cfg = change(cfg) if callable(change) else {**cfg, **change}
    path.write_text(json.dumps(cfg))


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def broken(request, tmp_path, tiny_ckpt) -> tuple[Path, str]:
    _, name, change, needle = request.param
    ckpt = Path(shutil.copytree(tiny_ckpt, tmp_path / "model"))
    damage(ckpt, name, change)
    return ckpt, needle


def run_cli(capsys, *args) -> str:
    """Runs `parrot ARGS` in this process; asserts exit 1 and one final stderr line `Error: ...`; returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert e.value.code == 1, out + err
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()  # progress lines ("Loading ...") may come first
    assert lines and lines[-1].startswith("Error: ") and sum(x.startswith("Error") for x in lines) == 1, err
    return lines[-1]


def test_convert_refuses_malformed_config_and_writes_nothing(capsys, broken, tmp_path):
    ckpt, needle = broken
    dst = tmp_path / "out"
    line = run_cli(capsys, "convert", ckpt, dst, "--to", "mlx")
    assert needle in line
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary directory left behind


@requires_torch
def test_chat_refuses_malformed_config(capsys, broken):
    ckpt, needle = broken
    line = run_cli(capsys, "chat", "--backend", "cpu", "--model", ckpt, "-p", "hi")
    assert needle in line


@requires_torch
def test_train_refuses_malformed_config_and_writes_nothing(capsys, broken, tmp_path):
    ckpt, needle = broken
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "Hi"},
                                                              {"from": "gpt", "value": "Hello"}]}]))
    out = tmp_path / "run"
    line = run_cli(capsys, "train", "--backend", "cpu", "--stage", "2", "--model", ckpt, "--data", data,
                   "--output", out, "--num-workers", "0")
    assert needle in line
    assert not out.exists()


@requires_torch
def test_run_config_on_resume_is_checked(capsys, tmp_path, tiny_ckpt):
    """A checkpoint whose run_config.json has a wrong field: `--resume` names it instead of crashing."""
    out, data = tmp_path / "run", tmp_path / "data.json"
    data.write_text("[]")
    ckpt = out / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    saved = TrainConfig(stage=2, data=str(data), output=str(out), model=str(tiny_ckpt), backend="cpu").resolved()
    (ckpt / "run_config.json").write_text(json.dumps({"config": {**saved.to_dict(), "lr": "fast"}}))
    (out / "run_config.json").write_text((ckpt / "run_config.json").read_text())  # a run directory's own record
    line = run_cli(capsys, "train", "--backend", "cpu", "--stage", "2", "--model", tiny_ckpt, "--data", data,
                   "--output", out, "--resume")
    assert 'run_config.json: config.lr is "fast" (a string); expected a number >= 0' in line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "run_config.json"]  # nothing new
