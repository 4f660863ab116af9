"""Shared fixtures: tiny random checkpoints (never the hub), backend availability, CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("MLX_DISABLE_COMPILE", "1")  # mx.compile JIT-builds C++ on Linux; one test turns it on
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tiny models: one thread each is faster than two threads spin-waiting on a busy 2-core machine, and
# subprocesses (CLI tests, torchrun workers) inherit it
os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from parrot.testing import TinySpec, spec_variants, write_tiny_checkpoint  # noqa: E402

HAS_MLX = importlib.util.find_spec("mlx") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None
requires_mlx = pytest.mark.skipif(not HAS_MLX, reason="MLX is not installed (pip install 'parrot-vlm[mlx]')")
requires_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed (pip install 'parrot-vlm[torch]')")
# the backends a parametrized test runs on, each skipped where its package is missing
BACKENDS = [pytest.param("cpu", marks=requires_torch), pytest.param("mlx", marks=requires_mlx)]


def _cuda_visible() -> bool:
    if not HAS_TORCH:
        return False
    import torch

    return torch.cuda.is_available()


# CUDA tests run on a GPU machine (scripts/gpu_check.sh); elsewhere they are skipped with this reason
requires_cuda = pytest.mark.skipif(not _cuda_visible(), reason="no CUDA GPU (torch sees none)")



@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """The default tiny official-layout checkpoint (fp32, GQA, rope_theta 12345, moe_weight 0.25)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "parrot-tiny", TinySpec(), seed=0)


@pytest.fixture(scope="session", params=range(len(spec_variants())), ids=["gqa", "mha-3layer", "tied-mqa"])
def tiny_variant(request, tmp_path_factory) -> Path:
    spec = spec_variants()[request.param]
    out = tmp_path_factory.mktemp(f"variant{request.param}") / "ckpt"
    return write_tiny_checkpoint(out, spec, seed=10 + request.param)


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


@pytest.fixture
def image_file(tmp_path) -> Path:
    p = tmp_path / "photo.png"
    random_image(41, 27, seed=3).save(p)
    return p


def run_parrot(*args: str, input: str | None = None, timeout: float = 300, env: dict | None = None,
               cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Runs the `parrot` CLI in a subprocess (so exit codes and stderr are real)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "parrot.cli.main", *map(str, args)],
        input=input, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd,
    )


def run_parrot_here(*args: str) -> subprocess.CompletedProcess:
    """The `parrot` CLI in this process (no interpreter start-up, no torch import per call): for the many
    error cases. An exception that escapes `main` is reported as a traceback, as a real process would."""
    import contextlib
    import io
    import traceback

    from parrot.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001  (what a process would print before dying)
            err.write(traceback.format_exc())
            code = 1
    return subprocess.CompletedProcess(["parrot", *map(str, args)], code, out.getvalue(), err.getvalue())


def assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Non-zero exit, one clear message containing every needle, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    for n in needles:
        assert n.lower() in out.lower(), f"{n!r} not in: {out}"


BLOCK_IMPORTS = Path(__file__).parent / "support" / "block_imports"


def without_packages(*names: str) -> dict:
    """Environment for a subprocess in which `names` (e.g. "torch", "mlx") look uninstalled."""
    pp = os.pathsep.join([str(BLOCK_IMPORTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": pp, "PARROT_TEST_BLOCK": ",".join(names)}


def pytest_terminal_summary(terminalreporter) -> None:
    """How many cases each fuzzed loader was fed (tests/fuzz.py), for docs/benchmarks.md's Reliability section."""
    fuzz = sys.modules.get("fuzz")
    if fuzz is not None and fuzz.COUNTS:
        terminalreporter.write_sep("-", "fuzz cases per loader")
        for name, n in sorted(fuzz.COUNTS.items()):
            terminalreporter.write_line(f"{name}: {n} cases, {fuzz.REFUSED[name]} refused with a clear error")
        for name, n in sorted(fuzz.NOTES.items()):
            terminalreporter.write_line(f"{name}: {n}")
