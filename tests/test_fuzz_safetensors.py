"""Fuzzing the safetensors reader: damaged bytes, damaged headers (dtypes, shapes, offsets, overlapping
or out-of-range data, header lengths), truncated files and damaged shard indexes. Whatever the bytes,
the reader returns tensors that fit in the file or raises ParrotError; it never allocates more than
the file holds (see tests/fuzz.py)."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from fuzz import FUZZ, cases, dumps, mutate_bytes, mutate_json, only_parrot_errors, write
from hypothesis import given

from parrot.errors import ParrotError
from parrot.storage.safetensors_io import INDEX_NAME, CheckpointFiles, SafetensorsFile, save_file, save_tensors

TENSORS = {
    "model.a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
    "model.b.weight": np.ones(4, dtype=ml_dtypes.bfloat16),
    "model.c": np.zeros(0, dtype=np.int64),
    "model.d": np.arange(6, dtype=np.uint8).reshape(3, 1, 2),
    "model.e": np.array(1.5, dtype=np.float16),
}


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory) -> tuple[Path, bytes, dict, bytes]:
    """A valid file, its bytes, its header (parsed) and its data section."""
    path = tmp_path_factory.mktemp("fuzz-st") / "x.safetensors"
    save_file(TENSORS, path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return path, raw, json.loads(raw[8:8 + n]), raw[8 + n:]


def header_input(r, header: dict, data: bytes) -> bytes:
    """A file whose header is `header` with entries mutated (dtype, shape, offsets, metadata), behind a
    length prefix that is usually right, and a data section sometimes cut or grown."""
    h = mutate_json(r, header, ["__metadata__", "model.f"])
    text = dumps(h)
    n = r.choice([len(text)] * 6 + [len(text) - 1, len(text) + 1, 0, 2**60, 2**64 - 1, len(text) + len(data)])
    if r.random() < 0.3:
        data = data[: r.randrange(len(data) + 1)] if r.random() < 0.5 else data + r.randbytes(r.randrange(64))
    return struct.pack("<Q", n) + text + data


def read_everything(path: Path) -> int:
    f = SafetensorsFile(path)
    total = 0
    for k in f.keys():
        a = f.read(k)
        assert a.nbytes == f.tensors[k].nbytes
        total += a.nbytes
    return total


@FUZZ(2500)
@given(r=cases())
def test_safetensors_reader_raises_only_parrot_errors(seed_file, r):
    path, raw, header, data = seed_file
    blob = mutate_bytes(r, raw) if r.random() < 0.4 else header_input(r, header, data)
    write(path, blob)
    total = only_parrot_errors("safetensors file (SafetensorsFile)", read_everything, path)
    if total is not None:
        assert total <= len(blob)  # what was read lies inside the file


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("fuzz-index")
    save_tensors({k: np.ascontiguousarray(v) for k, v in TENSORS.items()}, d, max_shard_bytes=20)
    return d, json.loads((d / INDEX_NAME).read_text())


@FUZZ(2000)
@given(r=cases())
def test_shard_index_raises_only_parrot_errors(sharded, r):
    d, index = sharded
    raw = mutate_bytes(r, dumps(index)) if r.random() < 0.25 else dumps(mutate_json(r, index, ["weight_map"]))
    write(d / INDEX_NAME, raw)
    files = only_parrot_errors("sharded index (CheckpointFiles)", CheckpointFiles, d)
    if files is not None:
        assert all(files.info(k).nbytes >= 0 for k in files.keys())


# ---------------------------------------------------------------- memory: sizes checked against the file first
def _header_file(path: Path, header: dict, data: bytes = b"", length: int | None = None) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


@pytest.mark.parametrize("header, length, needle", [
    ({"x": {"dtype": "F32", "shape": [10**15], "data_offsets": [0, 4 * 10**15]}}, None, "truncated"),
    ({"x": {"dtype": "F32", "shape": [10**8, 10**7], "data_offsets": [0, 16]}}, None, "wrong size"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 2**60, "header of 1152921504606846976 bytes"),
    ({"x": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, None, "shape [-2, -2]"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, None, "overlap"),
    ({"x": {"dtype": "F32", "shape": [1] * 40 + [0], "data_offsets": [0, 0]}}, None, "at most 32"),
    ({"x": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, None, "unsupported dtype"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}}, None, "data_offsets"),
    ({"__metadata__": [1], "x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, None, "__metadata__"),
])
def test_header_claims_are_checked_against_the_file_before_allocating(tmp_path, header, length, needle):
    path = _header_file(tmp_path / "x.safetensors", header, bytes(16), length)
    tracemalloc.start()
    try:
        with pytest.raises(ParrotError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            read_everything(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak} bytes allocated for a {path.stat().st_size}-byte file"
