"""The output rule every command that writes follows (convert, train, generate, and later eval, inspect):

1. An output is never an input, never inside one and never contains one (`check_output`): paths are
   compared as the file system sees them (symlinks resolved, hard links and case-insensitive names
   caught by `os.path.samefile`).
2. Nothing the command did not create is deleted: an existing output directory is replaced only with
   `force` AND when it is a previous output of the same command, recognized by the marker file
   `OUTPUT_MARKER` (`.parrot-output.json`: `{"command": "convert", "version": ...}`) written into every
   output directory (`is_output_of`).
3. Files and directories are written under a temporary name beside the destination and renamed into
   place, created with the permissions the umask gives (0644 / 0755 under umask 022), unlike
   tempfile's private 0600 / 0700.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import ParrotError

OUTPUT_MARKER = ".parrot-output.json"
PathLike = str | os.PathLike


# ---------------------------------------------------------------- 1. outputs never touch inputs
def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _lineage(p: Path) -> list[Path]:
    """`p` and its existing ancestors, nearest first, symlinks resolved."""
    p = Path(os.path.abspath(p))
    return [q for q in (p, *p.parents) if q.exists()]


def overlap(output: PathLike, source: PathLike) -> str | None:
    """How `output` relates to the existing `source`: "is", "lies inside", "contains", or None."""
    out, src = Path(output), Path(source)
    if not src.exists():
        return None
    if out.exists() and _same(out, src):
        return "is"
    for anc in _lineage(out)[1:] if out.exists() else _lineage(out):
        if _same(anc, src):
            return "lies inside"
    if out.exists() and out.is_dir():
        for anc in _lineage(src)[1:]:
            if _same(anc, out):
                return "contains"
    return None


def check_output(output: PathLike, inputs: Iterable[tuple[str, PathLike | None]], name: str = "output",
                 folders: Iterable[tuple[str, PathLike | None]] = ()) -> Path:
    """Refuses an `output` that is, lies inside or contains any of `inputs` ((label, path); missing or None
    paths are skipped). `folders` are inputs an output may lie inside but must neither be nor contain (an
    image folder that also holds the outputs). Returns `output` as a Path."""
    out = Path(output)
    checks = [(label, p, False) for label, p in inputs] + [(label, p, True) for label, p in folders]
    for label, p, inside_ok in checks:
        if p is None:
            continue
        how = overlap(out, p)
        if how is None or (how == "lies inside" and inside_ok):
            continue
        raise ParrotError(f"{name} {out}: {how} the {label} {p}; writing there could overwrite or delete the "
                          f"{label}. Choose another {name}.")
    return out


# ---------------------------------------------------------------- 2. previous outputs
def mark_output(directory: PathLike, command: str) -> None:
    """Marks `directory` as written by `parrot <command>` (what `--force` may replace)."""
    from .. import __version__

    Path(directory, OUTPUT_MARKER).write_text(json.dumps({"command": command, "version": __version__}) + "\n",
                                              encoding="utf-8")


def is_output_of(directory: PathLike, command: str) -> bool:
    """Whether `directory` holds the marker of a previous `parrot <command>` output."""
    p = Path(directory, OUTPUT_MARKER)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("command") == command


def check_replaceable(dst: PathLike, force: bool, command: str | None, name: str = "DST") -> None:
    """An existing `dst` needs `force`, and `force` replaces only a previous output of `command`."""
    dst = Path(dst)
    if not (dst.exists() or dst.is_symlink()):
        return
    what = f"parrot {command}" if command else "this command"
    ours = command is not None and dst.is_dir() and not dst.is_symlink() and is_output_of(dst, command)
    if not ours:
        raise ParrotError(f"{name} {dst}: already exists and is not the output of a previous `{what}` (no "
                          f"{OUTPUT_MARKER} in it); nothing is replaced. Choose another {name}, or remove it "
                          "yourself.")
    if not force:
        raise ParrotError(f"{name} {dst}: already exists (a previous `{what}` output); pass --force to replace it")


# ---------------------------------------------------------------- 3. temporary paths renamed into place
def current_umask() -> int:
    """The process's umask (Linux: read from /proc, without changing it; elsewhere set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: PathLike) -> None:
    """Gives a file written by a library that creates private files (safetensors' save_file: 0600) the
    permissions the umask gives a new file."""
    os.chmod(path, 0o666 & ~current_umask())


def _fresh_name(parent: Path, stem: str, kind: str) -> Path:
    return parent / f".{stem}.{kind}-{secrets.token_hex(4)}"


def make_fresh_dir(parent: PathLike, stem: str, kind: str = "tmp") -> Path:
    """A new empty directory `parent/.stem.kind-XXXXXXXX`, with the umask's permissions."""
    parent = Path(parent)
    while True:
        p = _fresh_name(parent, stem, kind)
        try:
            os.mkdir(p)  # mode 0o777 & ~umask, unlike tempfile.mkdtemp's 0o700
            return p
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_output_dir(dst: PathLike, force: bool = False, command: str | None = None) -> Iterator[Path]:
    """Yields a fresh temporary directory that becomes `dst` only if the block succeeds.

    An existing `dst` is refused unless `force` and it is a previous output of `command` (its
    marker); it is replaced only at the end, so a failure leaves it untouched. With `command`, the
    marker is written into the new output. On any error the temporary directory is removed.
    """
    dst = Path(dst)
    check_replaceable(dst, force, command)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_fresh_dir(dst.parent, dst.name)
    try:
        yield tmp
        if command is not None:
            mark_output(tmp, command)
        if dst.exists():
            check_replaceable(dst, force, command)  # still ours after the (long) write
            old = make_fresh_dir(dst.parent, dst.name, "old")
            os.replace(dst, old / "x")
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output_file(dst: PathLike, mode: str = "w", **kw) -> Iterator:
    """An open file that replaces `dst` only when the block succeeds (umask permissions)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _fresh_name(dst.parent, dst.name, "tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask
            break
        except FileExistsError:
            continue
    os.close(fd)
    try:
        with open(tmp, mode, **kw) as f:
            yield f
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
