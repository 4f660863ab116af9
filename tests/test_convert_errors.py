"""Bad inputs to `parrot convert`, through the real CLI: one clear message naming the file or key at
fault, a non-zero exit, no traceback, and no destination (nor temporary directory) left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_clean_failure, run_parrot
from parrot.convert import convert_checkpoint
from parrot.errors import ParrotError
from parrot.storage.safetensors_io import CheckpointFiles, save_tensors
from parrot.testing import TinySpec, write_tiny_checkpoint


@pytest.fixture
def src(tmp_path, tiny_ckpt) -> Path:
    """A private copy of the tiny checkpoint, to damage."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "src"))


def assert_no_output(dst: Path) -> None:
    assert not dst.exists()
    leftovers = [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]
    assert leftovers == []


def rewrite_weights(directory: Path, change) -> None:
    files = CheckpointFiles(directory)
    tensors = {k: files.read(k) for k in files.keys()}
    change(tensors)
    for p in directory.glob("*.safetensors"):
        p.unlink()
    save_tensors(tensors, directory)


def convert_fails(src, dst, *needles, extra=()):
    proc = run_parrot("convert", src, dst, *extra)
    assert_clean_failure(proc, *needles)
    assert proc.returncode == 1
    assert_no_output(Path(dst))
    return proc


def test_missing_source(tmp_path):
    convert_fails(tmp_path / "nope", tmp_path / "out", str(tmp_path / "nope"), "not found")


def test_missing_config(src, tmp_path):
    (src / "config.json").unlink()
    convert_fails(src, tmp_path / "out", str(src / "config.json"), "not found")


def test_malformed_config(src, tmp_path):
    (src / "config.json").write_text("{ not json")
    convert_fails(src, tmp_path / "out", str(src / "config.json"), "not valid JSON")


def test_unknown_model_type(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    convert_fails(src, tmp_path / "out", "config.json", "model_type is 'llama'", "parrot_qwen2")


def test_truncated_safetensors(src, tmp_path):
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    convert_fails(src, tmp_path / "out", str(f), "truncated")


def test_corrupt_safetensors_header(src, tmp_path):
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    f.write_bytes(bytes(data))
    convert_fails(src, tmp_path / "out", str(f), "corrupt")


def test_shard_listed_in_index_but_missing(tmp_path):
    src = write_tiny_checkpoint(tmp_path / "src", TinySpec(), max_shard_bytes=200_000)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    convert_fails(src, tmp_path / "out", shard.name, "missing")


def test_missing_tensor(src, tmp_path):
    rewrite_weights(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    convert_fails(src, tmp_path / "out", "model.layers.1.mlp.up_proj.weight", "missing")


def test_misshaped_tensor(src, tmp_path):
    def change(t):
        t["model.layers.0.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"][:, :32].copy()

    rewrite_weights(src, change)
    convert_fails(src, tmp_path / "out", "model.layers.0.self_attn.o_proj.weight", "shape (64, 32)", "(64, 64)")


def test_unexpected_tensor(src, tmp_path):
    def change(t):
        t["model.layers.9.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"]

    rewrite_weights(src, change)
    convert_fails(src, tmp_path / "out", "model.layers.9.mlp.up_proj.weight", "unexpected")


def test_missing_tokenizer_files(src, tmp_path):
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (src / name).unlink()
    convert_fails(src, tmp_path / "out", str(src), "tokenizer")


def test_unresolvable_vision_tower(src, tmp_path):
    shutil.rmtree(src / "clip-vit-tiny")
    convert_fails(src, tmp_path / "out", "mm_vision_tower", "--vision-tower")


def test_bad_vision_tower_argument(src, tmp_path):
    convert_fails(src, tmp_path / "out", "nowhere/at-all", extra=("--vision-tower", str(tmp_path / "nowhere/at-all")))


def test_quantized_mlx_without_quantization_entry(src, tmp_path):
    convert_checkpoint(src, tmp_path / "q8", quantize_bits=8)
    cfg = json.loads((tmp_path / "q8" / "config.json").read_text())
    del cfg["quantization"]
    (tmp_path / "q8" / "config.json").write_text(json.dumps(cfg))
    convert_fails(tmp_path / "q8", tmp_path / "out", "is quantized", "no quantization entry")


def test_existing_destination_is_refused_without_force(src, tmp_path):
    dst = tmp_path / "out"
    assert run_parrot("convert", src, dst).returncode == 0  # a previous `parrot convert` output
    (dst / "keep.txt").write_text("mine")
    proc = run_parrot("convert", src, dst)
    assert_clean_failure(proc, str(dst), "already exists", "--force")
    assert (dst / "keep.txt").read_text() == "mine"

    (src / "model.safetensors").write_bytes(b"\x00" * 4)  # a failing conversion keeps the old DST
    proc = run_parrot("convert", src, dst, "--force")
    assert_clean_failure(proc, "model.safetensors")
    assert (dst / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_force_replaces_a_previous_convert_output(tiny_ckpt, tmp_path):
    dst = tmp_path / "out"
    assert run_parrot("convert", tiny_ckpt, dst, "--to", "hf").returncode == 0
    (dst / "stale.txt").write_text("old")
    proc = run_parrot("convert", tiny_ckpt, dst, "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (dst / "stale.txt").exists() and (dst / "config.json").is_file()


def test_force_never_replaces_what_convert_did_not_write(tiny_ckpt, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    proc = run_parrot("convert", tiny_ckpt, dst, "--force")
    assert_clean_failure(proc, str(dst), "not the output of a previous `parrot convert`")
    assert (dst / "notes.txt").read_text() == "mine" and sorted(p.name for p in dst.iterdir()) == ["notes.txt"]


def test_destination_equal_to_source_is_refused(src):
    for extra in ((), ("--force",)):  # the first message already says what is wrong (not "pass --force")
        proc = run_parrot("convert", src, src, *extra)
        assert_clean_failure(proc, "is the source")
        assert "--force to replace" not in proc.stderr
    assert (src / "config.json").is_file()


@pytest.mark.parametrize("args,needle", [
    (("--to", "hf", "-q", "4"), "--to mlx"),
    (("--group-size", "32"), "-q 4"),
    (("--no-quantize-experts",), "-q 4"),
    (("-q", "3"), "'3' is not one of"),
    (("-q", "4", "--group-size", "48"), "'48' is not one of"),
    (("--dtype", "float64"), "'float64' is not one of"),
    (("--to", "gguf"), "'gguf' is not one of"),
])
def test_unsupported_options(tiny_ckpt, tmp_path, args, needle):
    proc = run_parrot("convert", tiny_ckpt, tmp_path / "out", *args)
    assert_clean_failure(proc, needle)
    assert_no_output(tmp_path / "out")


def test_failure_midway_leaves_no_destination(tiny_ckpt, tmp_path, monkeypatch):
    from parrot.convert import sources

    real = sources._parrot_dir_tensors

    def failing(ckpt):
        tensors = real(ckpt)
        victim = tensors[len(tensors) // 2]

        def read():
            raise ParrotError(f"{ckpt.path}: truncated while reading tensor {victim.key!r}")

        victim.read = read
        return tensors

    monkeypatch.setattr(sources, "_parrot_dir_tensors", failing)
    written = []
    with pytest.raises(ParrotError, match="truncated while reading"):
        convert_checkpoint(tiny_ckpt, tmp_path / "out", progress=written.append)
    assert len(written) > 0  # it failed after writing part of the output
    assert_no_output(tmp_path / "out")


def test_disk_full_is_reported_and_leaves_no_destination(tiny_ckpt, tmp_path, monkeypatch):
    import errno

    from parrot.storage.safetensors_io import ShardedWriter

    real = ShardedWriter.write
    calls = []

    def write(self, key, array):
        calls.append(key)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, array)

    monkeypatch.setattr(ShardedWriter, "write", write)
    with pytest.raises(ParrotError, match="No space left on device"):
        convert_checkpoint(tiny_ckpt, tmp_path / "out")
    assert_no_output(tmp_path / "out")
