"""Fuzzed inputs through the CLI (in-process, `parrot.cli.main.main`): `parrot convert` on a model with a
damaged config.json or safetensors file, `parrot chat` on damaged image bytes. Each run either succeeds or
exits 1 with one final line `Error: ...`, no traceback, and nothing written. A few cases only: each
failing case is cheap, but a succeeding one converts or loads a model."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fuzz import COUNTS, FUZZ, REFUSED, cases, json_input, mutate_bytes, write
from hypothesis import given
from PIL import Image

from conftest import requires_torch
from parrot.cli.main import main
from parrot.model.schema import PARROT_CONFIG

_run = itertools.count()


def run_cli(capsys, name: str, *args) -> int:
    """`parrot ARGS` in this process: exit 0, or exit 1 with a last stderr line `Error: ...` (and no other)."""
    COUNTS[name] += 1
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if code:
        REFUSED[name] += 1
        lines = err.strip().splitlines()
        assert code == 1 and lines[-1].startswith("Error: ") and sum(x.startswith("Error") for x in lines) == 1, err
    return code


@pytest.fixture(scope="module")
def src(tmp_path_factory, tiny_ckpt) -> tuple[Path, Path, dict, bytes]:
    root = tmp_path_factory.mktemp("fuzz-cli")
    model = Path(shutil.copytree(tiny_ckpt, root / "model"))
    return root, model, json.loads((model / "config.json").read_text()), (model / "model.safetensors").read_bytes()


@FUZZ(80)
@given(r=cases())
def test_convert_on_fuzzed_model_files_exits_cleanly(capsys, src, r):
    root, model, config, weights = src
    damage_config = r.random() < 0.6
    write(model / "config.json", json_input(r, config, sorted(PARROT_CONFIG.fields)) if damage_config
          else json.dumps(config).encode())
    write(model / "model.safetensors", weights if damage_config else mutate_bytes(r, weights, edits=2))
    dst = root / f"out{next(_run)}"
    code = run_cli(capsys, "CLI: parrot convert on fuzzed model files", "convert", model, dst, "--to", "mlx")
    assert dst.exists() == (code == 0)
    assert not [p for p in root.iterdir() if p.name.startswith(f".{dst.name}.")]  # no temporary left


@requires_torch
@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on damaged TIFF tags
@FUZZ(15)
@given(r=cases())
def test_chat_on_fuzzed_image_bytes_exits_cleanly(capsys, src, r):
    root, model, config, weights = src
    write(model / "config.json", json.dumps(config).encode())
    write(model / "model.safetensors", weights)
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((9, 13, 3)) * 255).astype(np.uint8))
    fmt = r.choice(["PNG", "JPEG", "GIF", "BMP", "TIFF"])
    path = root / f"photo.{fmt.lower()}"
    image.save(path, format=fmt)
    write(path, mutate_bytes(r, path.read_bytes(), protect=r.choice([0, 8])))
    run_cli(capsys, "CLI: parrot chat on fuzzed image bytes", "chat", path, "--backend", "cpu", "--model", model,
            "-p", "hi", "-m", "1")
