"""Outputs are written to a temporary path beside the destination and renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ParrotError


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, force: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory that becomes `dst` only if the block succeeds.

    An existing `dst` is refused unless `force`; with `force` it is replaced only at the end, so a
    failure leaves it untouched. On any error the temporary directory is removed.
    """
    dst = Path(dst)
    if dst.exists() and not force:
        raise ParrotError(f"{dst}: already exists; pass --force to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / "x")
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output_file(dst: str | Path, mode: str = "w", **kw) -> Iterator:
    """An open file that replaces `dst` only when the block succeeds."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.tmp-", dir=dst.parent)
    os.close(fd)
    try:
        with open(tmp, mode, **kw) as f:
            yield f
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
