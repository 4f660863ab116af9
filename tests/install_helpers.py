"""The files of a clean checkout, for tests that copy the repository (wheel build, README quick start)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SKIP = {".venv", ".git", "build", "dist", "out", "__pycache__", ".pytest_cache", ".ruff_cache"}


def checkout_files() -> list[str]:
    """Tracked files plus new files git does not ignore (without git: all but the usual build outputs)."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        return sorted({f for f in out.split("\0") if f and (ROOT / f).is_file()})
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                  if p.is_file() and not _SKIP & set(p.relative_to(ROOT).parts) and ".egg-info" not in str(p))


def copy_checkout(dst: Path) -> Path:
    for f in checkout_files():
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    return dst
