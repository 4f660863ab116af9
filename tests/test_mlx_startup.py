"""The MLX path never imports torch, even where torch is installed.

mlx-lm's package `__init__` imports transformers, which imports torch (about 3 s of start-up);
parrot.backends.mlx.mlxlm imports the pure-MLX parts of mlx-lm without it. Keep this invariant:
any new `import mlx_lm...` in the MLX backend must go through `parrot.backends.mlx.mlxlm`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import random_image, requires_mlx, requires_torch, without_packages

pytestmark = [requires_mlx, requires_torch]  # torch must be installed for "not imported" to mean something

HEAVY = ("torch", "transformers")
# runs the CLI in-process, then reports which heavy packages got imported (atexit: after sys.exit too)
PROBE = (
    "import atexit, json, sys\n"
    f"atexit.register(lambda: print('IMPORTED ' + json.dumps(sorted({{m.split('.')[0] for m in sys.modules}}"
    f" & set({HEAVY!r}))), file=sys.stderr))\n"
    "from parrot.cli.main import main\n"
    "main(sys.argv[1:])\n"
)


def _imported(*args, cwd) -> list[str]:
    """Runs `parrot ARGS`; returns the heavy packages it imported."""
    p = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    (line,) = [x for x in p.stderr.splitlines() if x.startswith("IMPORTED ")]
    return json.loads(line[len("IMPORTED "):])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_ckpt):
    d = tmp_path_factory.mktemp("mlx-startup")
    random_image(41, 27, seed=3).save(d / "photo.png")
    (d / "requests.jsonl").write_text(json.dumps({"id": 1, "image": "photo.png", "prompt": "Hi"}) + "\n")
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A colour."}]
    (d / "data.json").write_text(json.dumps([{"id": "a", "image": "photo.png", "conversations": conv}]))
    return d


def test_mlx_commands_do_not_import_torch(workdir, tiny_ckpt):
    """convert to MLX (8-bit), chat, generate and train on MLX: none imports torch or transformers."""
    assert _imported("convert", tiny_ckpt, "tiny-mlx", "-q", "8", cwd=workdir) == []
    assert _imported("chat", "--backend", "mlx", "--model", "tiny-mlx", "photo.png", "-p", "Hi", "-m", "3",
                     cwd=workdir) == []
    assert _imported("generate", "--backend", "mlx", "--model", "tiny-mlx", "-i", "requests.jsonl", "-o",
                     "answers.jsonl", "-m", "3", "--quiet", cwd=workdir) == []
    assert _imported("train", "--backend", "mlx", "--stage", "2", "--model", "tiny-mlx", "--lora", "--data",
                     "data.json", "--output", "run", "--max-steps", "1", "--num-workers", "0", cwd=workdir) == []
    # the probe does see torch when a command uses it
    assert _imported("chat", "--backend", "cpu", "--model", tiny_ckpt, "photo.png", "-p", "Hi", "-m", "1",
                     cwd=workdir) == ["torch", "transformers"]


def test_mlx_lm_imported_afterwards_is_the_whole_package(tiny_ckpt):
    """After the backend's import, `import mlx_lm` runs mlx-lm's own __init__ and shares the classes."""
    code = (
        "import sys\n"
        "import parrot.backends.mlx.api as api\n"
        "from parrot.backends.mlx import mlxlm\n"
        "assert 'mlx_lm' not in sys.modules and 'mlx_lm.tuner' not in sys.modules  # no placeholder left\n"
        "assert 'mlx_lm.models.qwen2' in sys.modules and 'transformers' not in sys.modules\n"
        "import mlx_lm\n"
        "from mlx_lm.models.cache import BatchKVCache\n"
        "from mlx_lm.tuner import linear_to_lora_layers\n"
        "from mlx_lm.tuner.lora import LoRALinear\n"
        "assert callable(mlx_lm.stream_generate) and callable(mlx_lm.load) and callable(linear_to_lora_layers)\n"
        "assert BatchKVCache is mlxlm.BatchKVCache and LoRALinear is mlxlm.LoRALinear\n"
        "print('ok')\n"
    )
    env = {**os.environ, **without_packages("torch")}  # transformers works without it; faster
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_wired_limit_raises_the_limit_and_restores_it(monkeypatch):
    import mlx.core as mx
    import mlx.nn as nn

    from parrot.backends.mlx import mlxlm

    calls = []
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 4096})
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 7)
    monkeypatch.setattr(mx, "synchronize", lambda s=None: calls.append(("sync", s)))
    stream = mx.default_stream(mx.default_device())
    with mlxlm.wired_limit(nn.Linear(4, 4), [stream]):
        assert calls == [4096]
    assert calls == [4096, ("sync", stream), 7]

    monkeypatch.setattr(mx, "device_info", lambda: {})  # CPU: no recommended size, nothing changes
    calls.clear()
    with mlxlm.wired_limit(nn.Linear(4, 4), [stream]):
        pass
    assert calls == []
