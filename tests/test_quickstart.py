"""The README's quick start, run line by line exactly as written, so it cannot rot.

Each line runs in bash in a fresh copy of the checkout (a git repository: afterwards `git status`
must show nothing new), with the test venv's bin first on PATH, as after `. .venv/bin/activate`.
The first line (the install) is not run: the test venv is what `make install` builds. The Mac path
(`pip install -e ".[mlx]"`, no torch) runs the same lines with torch made unimportable.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from install_helpers import ROOT, copy_checkout

from conftest import requires_mlx, requires_torch, without_packages

pytestmark = [requires_mlx, pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")]


def quickstart_lines() -> list[str]:
    """The commands of the first bash block under '## Quick start' in README.md."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's Quick start has no ```bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def run_quickstart(tmp_path: Path, env: dict) -> list[subprocess.CompletedProcess]:
    install, *lines = quickstart_lines()
    assert install.startswith("make install && . .venv/bin/activate") and 'pip install -e ".[mlx]"' in install
    repo = copy_checkout(tmp_path / "checkout")
    git = ["git", "-c", "core.autocrlf=false"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, **env, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
           "VIRTUAL_ENV": str(Path(venv_bin).parent)}
    done = []
    for line in lines:
        p = subprocess.run(["bash", "-c", line], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"README quick start line failed: {line}\n{p.stdout}\n{p.stderr}"
        done.append(p)
    new = subprocess.run([*git, "ls-files", "--others", "--exclude-standard"], cwd=repo, capture_output=True,
                         text=True, check=True).stdout.split()
    changed = subprocess.run([*git, "diff", "--name-only"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout.split()
    assert (new, changed) == ([], []), "the quick start left files in the repository (git status is not clean)"
    assert (repo / "out" / "tiny-parrot-mlx" / "config.json").is_file()
    return done


def _chats(done: list[subprocess.CompletedProcess]) -> list[subprocess.CompletedProcess]:
    chats = [p for p in done if p.args[2].startswith("parrot chat")]
    assert len(chats) == 2
    return chats


@requires_torch
def test_readme_quickstart_runs_as_written(tmp_path):
    first, second = _chats(run_quickstart(tmp_path, {}))
    assert "(cpu)" in first.stderr or "(cuda)" in first.stderr, first.stderr  # torch here: chat's default
    assert "(mlx)" in second.stderr
    assert first.stdout.strip() and second.stdout.strip()


def test_readme_quickstart_runs_on_the_mac_path_without_torch(tmp_path):
    """`pip install -e ".[mlx]"`: no torch. Every line still works; the first chat defaults to MLX."""
    first, second = _chats(run_quickstart(tmp_path, without_packages("torch")))
    assert "(mlx)" in first.stderr and "(mlx)" in second.stderr
    assert first.stdout.strip() and second.stdout.strip()
