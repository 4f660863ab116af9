"""Installed as users install it: the wheel, in a fresh venv, without `-e`, run from outside the checkout.

How, and why this way (the whole module takes about half a minute):
- the wheel is built from a copy of the checkout's files (`git ls-files`: what a clean checkout
  holds), so nothing (build/, *.egg-info) is written into the repository, with
  `pip wheel --no-deps --no-build-isolation`: the test venv's setuptools (the `[dev]` extra pins
  one that reads the SPDX `license`) and no download;
- the fresh venv has no pip and no packages of its own: the test venv's pip installs the wheel into
  it (`pip --python`), then a `.pth` line appends the test venv's site-packages for the
  dependencies (torch, mlx, ...: reinstalling them would take minutes). A directory added by a `.pth`
  line does not get its own `.pth` files run, so the test venv's editable-install finder (which maps
  `parrot` to this checkout) is not active there: `test_parrot_comes_from_the_fresh_venv` checks it.
- every command runs through the fresh venv's `parrot` console script, in a directory outside the
  repository, so the checkout cannot be imported by accident.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from install_helpers import ROOT, checkout_files, copy_checkout

import parrot
from conftest import random_image, requires_mlx, requires_torch
from parrot.cli.repl import printable
from parrot.errors import ParrotError
from parrot.training.ds_config import read_ds_config

pytestmark = pytest.mark.slow  # builds a wheel and installs it into a fresh venv (make test runs it)

# source folder -> its package in the wheel (pyproject's [tool.setuptools.package-dir])
PACKAGE_DIRS = {"parrot_core": "parrot", "backends": "parrot/backends", "convert": "parrot/convert",
                "cli": "parrot/cli", "configs": "parrot/configs"}
# data files that commands read at run time, beside the code
DATA_FILES = ["parrot/py.typed", "parrot/configs/zero2.json", "parrot/configs/zero3.json",
              "parrot/serve/static/chat.html"]
QUESTION = "What is in the picture?"


def _run(cmd: list, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd}\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the wheel, the fresh venv, its environment for subprocesses, a work directory outside the repo)."""
    tmp = tmp_path_factory.mktemp("wheel-install")
    src = copy_checkout(tmp / "src")
    pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "-w", tmp / "dist", src], cwd=tmp, env=pip_env)
    (wheel,) = (tmp / "dist").glob("parrot_vlm-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=tmp,
         env=pip_env)
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp).stdout.strip()
    deps = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))  # the test venv's: torch, mlx, ...
    (Path(site) / "test_venv_dependencies.pth").write_text("".join(f"{d}\n" for d in deps))

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    work = tmp / "work"
    work.mkdir()
    return {"wheel": wheel, "venv": venv, "env": env, "work": work, "build_log": build.stdout + build.stderr}


def _parrot(installed, *args: str) -> subprocess.CompletedProcess:
    """The fresh venv's `parrot` console script, run in the work directory (outside the repository)."""
    return _run([installed["venv"] / "bin" / "parrot", *args], cwd=installed["work"], env=installed["env"])


def _python(installed, code: str) -> str:
    return _run([installed["venv"] / "bin" / "python", "-c", code], cwd=installed["work"],
                env=installed["env"]).stdout


def test_wheel_holds_every_module_and_data_file(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    sources = [f for f in checkout_files() if f.split("/")[0] in PACKAGE_DIRS and f.endswith(".py")]
    assert len(sources) > 50
    missing = [f for f in sources if f"{PACKAGE_DIRS[f.split('/')[0]]}/{f.split('/', 1)[1]}" not in names]
    assert missing == [], "not in the wheel (add the package to pyproject's [tool.setuptools] packages)"
    assert [f for f in DATA_FILES if f not in names] == []
    # nothing generic at the top of site-packages: one import package, its dist-info
    assert {n.split("/")[0] for n in names} == {"parrot", f"parrot_vlm-{parrot.__version__}.dist-info"}


def test_wheel_metadata_has_the_spdx_license_and_the_build_no_license_warning(installed):
    (meta,) = [n for n in zipfile.ZipFile(installed["wheel"]).namelist() if n.endswith(".dist-info/METADATA")]
    text = zipfile.ZipFile(installed["wheel"]).read(meta).decode()
    assert "License-Expression: Apache-2.0" in text
    assert "parrot = parrot.cli.main:main" in zipfile.ZipFile(installed["wheel"]).read(
        meta.replace("METADATA", "entry_points.txt")).decode()
    assert "project.license" not in installed["build_log"], installed["build_log"]  # the TOML-table deprecation


def test_parrot_comes_from_the_fresh_venv(installed):
    out = _python(installed, "import json, sys, parrot, parrot.cli.main, parrot.configs; print(json.dumps("
                  "[parrot.__file__, parrot.cli.main.__file__, parrot.configs.__file__, sys.prefix, "
                  "sorted(m for m in sys.modules if 'editable' in m)]))")
    files, prefix, editable = json.loads(out)[:3], json.loads(out)[3], json.loads(out)[4]
    venv = str(installed["venv"].resolve())
    assert all(f.startswith(venv) for f in files), files
    assert Path(prefix).resolve() == installed["venv"].resolve()
    assert editable == []  # the test venv's editable finder is not active in the fresh venv


def test_installed_parrot_help_and_version(installed):
    """`import importlib` alone does not provide importlib.util (an editable install's start-up hook did)."""
    p = _parrot(installed, "--help")
    assert "Usage: parrot" in p.stdout and all(c in p.stdout for c in ("chat", "convert", "train", "generate"))
    assert _parrot(installed, "--version").stdout.strip() == f"parrot, version {parrot.__version__}"


def test_installed_builtin_deepspeed_configs_match_the_repository(installed):
    out = _python(installed, "import json; from parrot.training.ds_config import read_ds_config; "
                  "print(json.dumps([read_ds_config('zero2'), read_ds_config('zero3')]))")
    z2, z3 = json.loads(out)
    assert z2 == json.loads((ROOT / "configs" / "zero2.json").read_text())
    assert z3 == json.loads((ROOT / "configs" / "zero3.json").read_text())
    assert (z2["zero_optimization"]["stage"], z3["zero_optimization"]["stage"]) == (2, 3)


def test_builtin_deepspeed_names_in_the_checkout_and_paths_still_work(tmp_path, monkeypatch):
    assert read_ds_config("zero3") == read_ds_config(ROOT / "configs" / "zero3.json")
    mine = tmp_path / "zero3"  # a file of the same name, in the working directory, wins
    mine.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    monkeypatch.chdir(tmp_path)
    assert read_ds_config("zero3") == {"zero_optimization": {"stage": 1}}
    with pytest.raises(ParrotError, match="zero2 .stage 1's recipe., zero3"):
        read_ds_config("zero4")


@pytest.fixture(scope="module")
def tiny_and_photo(installed):
    """A tiny checkpoint written by the installed package's own parrot.testing, and an image."""
    work = installed["work"]
    _python(installed, "from parrot.testing import write_tiny_checkpoint; write_tiny_checkpoint('tiny-parrot')")
    random_image(41, 27, seed=3).save(work / "photo.png")
    return work / "tiny-parrot", work / "photo.png"


@requires_torch
def test_installed_chat_on_torch_cpu(installed, tiny_and_photo):
    tiny, photo = tiny_and_photo
    p = _parrot(installed, "chat", "--backend", "cpu", "--model", "tiny-parrot", "photo.png", "-p", QUESTION,
                "-m", "8")
    want = parrot.load(tiny, backend="cpu").generate(QUESTION, photo, max_tokens=8)
    assert p.stdout == printable(want.text) + "\n"  # as the terminal shows it (control characters escaped)


@requires_mlx
def test_installed_convert_then_chat_on_mlx(installed, tiny_and_photo):
    tiny, photo = tiny_and_photo
    _parrot(installed, "convert", "tiny-parrot", "tiny-parrot-mlx", "-q", "8")
    assert json.loads((installed["work"] / "tiny-parrot-mlx" / "config.json").read_text())["quantization"]["bits"] == 8
    p = _parrot(installed, "chat", "--backend", "mlx", "--model", "tiny-parrot-mlx", "photo.png", "-p", QUESTION,
                "-m", "8")
    want = parrot.load(installed["work"] / "tiny-parrot-mlx", backend="mlx").generate(QUESTION, photo, max_tokens=8)
    assert p.stdout == printable(want.text) + "\n"
