"""The output rule (parrot.storage.fsutil) in every command that writes: an output is never an input, never inside
one and never contains one (through symlinks and hard links too); --force replaces only a previous output of
the same command; files get the umask's permissions."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from conftest import assert_clean_failure, requires_torch, run_parrot, run_parrot_here
from parrot.errors import ParrotError
from parrot.storage.fsutil import check_output, overlap


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def modes(folder: Path) -> dict[str, int]:
    """Permission bits of `folder` and of everything under it."""
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


@pytest.fixture
def src(tmp_path, tiny_ckpt) -> Path:
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "wrap" / "src"))


def test_overlap_sees_nesting_symlinks_and_hard_links(tmp_path):
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "sub" / "f.txt").write_text("x")
    (tmp_path / "link").symlink_to(a)
    os.link(a / "sub" / "f.txt", tmp_path / "hard.txt")
    assert overlap(a, a) == "is"
    assert overlap(tmp_path / "link", a) == "is"  # a symlink to the input
    assert overlap(tmp_path / "hard.txt", a / "sub" / "f.txt") == "is"  # a hard link to the input
    assert overlap(tmp_path / "link" / "new", a) == "lies inside"  # inside, through the symlink
    assert overlap(a / "sub" / "new" / "deeper", a) == "lies inside"  # not existing yet
    assert overlap(tmp_path, a / "sub" / "f.txt") == "contains"
    assert overlap(tmp_path / "b", a) is None and overlap(tmp_path / "b", tmp_path / "missing") is None
    with pytest.raises(ParrotError, match="lies inside the model"):
        check_output(a / "out.jsonl", [("model", a)])
    check_output(a / "out.jsonl", [], folders=[("image folder", a)])  # an output may lie in an image folder ...
    with pytest.raises(ParrotError, match="is the image folder"):
        check_output(a, [], folders=[("image folder", a)])  # ... but not be it


@pytest.mark.parametrize("force", [False, True])
def test_convert_into_the_folder_holding_the_source_deletes_nothing(src, force):
    wrap = src.parent
    (wrap / "unrelated.txt").write_text("mine")
    before = snapshot(wrap)
    proc = run_parrot("convert", src, wrap, *(["--force"] if force else []))
    assert_clean_failure(proc, "contains the source")
    assert proc.returncode == 1 and snapshot(wrap) == before


def test_convert_into_the_sources_own_tower_folder_is_refused(src):
    before = snapshot(src)
    for dst in (src / "clip-vit-tiny", src / "mlx"):  # an existing folder inside SRC, and a new one
        assert_clean_failure(run_parrot("convert", src, dst, "--force"), "lies inside the source")
    assert snapshot(src) == before and not (src / "mlx").exists()


def test_convert_destination_that_links_to_the_source_is_refused(src, tmp_path):
    (tmp_path / "alias").symlink_to(src)
    before = snapshot(src)
    assert_clean_failure(run_parrot("convert", src, tmp_path / "alias", "--force"), "is the source")
    tower = tmp_path / "tower"
    shutil.copytree(src / "clip-vit-tiny", tower)
    assert_clean_failure(run_parrot("convert", src, tower, "--force", "--vision-tower", tower),
                         "is the --vision-tower")
    assert snapshot(src) == before and (tower / "config.json").is_file()


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_generate_output_that_is_the_input_is_refused_first(how, tiny_ckpt, tmp_path):
    inp = tmp_path / "requests.jsonl"
    inp.write_text("".join(f'{{"id": "r{i}", "prompt": "Question {i}?"}}\n' for i in range(3)))
    out = {"same path": inp, "symlink": tmp_path / "answers.jsonl", "hard link": tmp_path / "answers.jsonl"}[how]
    if how == "symlink":
        out.symlink_to(inp)
    elif how == "hard link":
        os.link(inp, out)
    before = inp.read_bytes()
    proc = run_parrot("generate", "--backend", "cpu", "--model", tiny_ckpt, "-i", inp, "-o", out)
    assert_clean_failure(proc, "--output", "is the input")
    assert "answered" not in proc.stderr and "Loading" not in proc.stderr
    assert inp.read_bytes() == before


@requires_torch
def test_train_resume_into_a_folder_that_is_not_a_run_is_refused(tiny_ckpt, tmp_path):
    from train_helpers import write_dataset

    data, images = write_dataset(tmp_path / "d", n=2)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    base = ["train", "--backend", "cpu", "--stage", "2", "--model", tiny_ckpt, "--data", data, "--image-dir", images,
            "--num-workers", "0", "--max-steps", "1"]
    proc = run_parrot_here(*base, "--output", mine, "--resume")
    assert_clean_failure(proc, str(mine), "not a parrot train run directory")
    assert snapshot(mine) == {"thesis.tex": b"years of work"}
    inside = Path(tiny_ckpt) / "run"
    assert_clean_failure(run_parrot_here(*base, "--output", inside), "lies inside the --model")
    assert not inside.exists()
    assert_clean_failure(run_parrot_here(*base, "--output", tmp_path / "d"), "contains the --data")


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_converted_files_get_the_umask_permissions(umask, file_mode, dir_mode, tiny_ckpt, tmp_path):
    from parrot.convert import convert_checkpoint

    old = os.umask(umask)
    try:
        convert_checkpoint(tiny_ckpt, tmp_path / "mlx", to="mlx")
        convert_checkpoint(tiny_ckpt, tmp_path / "mlx", to="hf", force=True)  # replacing keeps the rule
    finally:
        os.umask(old)
    got = modes(tmp_path / "mlx")
    want = {k: dir_mode if (tmp_path / "mlx" / k).is_dir() else file_mode for k in got}
    assert got == want and len(got) > 5


def test_generate_never_takes_request_rows_for_answers(tmp_path):
    """Another requests file as -o (not a link to -i): its rows have ids but no text, so they are no answers."""
    from parrot.inference.answers import load_answers

    other = tmp_path / "other_requests.jsonl"
    other.write_text('{"id": "r0", "prompt": "Question 0?"}\n')
    with pytest.raises(ParrotError, match="line 1 is not an answer row"):
        load_answers(other)
    assert other.read_text() == '{"id": "r0", "prompt": "Question 0?"}\n'
