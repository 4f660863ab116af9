"""Safetensors reading and writing in numpy, one tensor at a time (bf16 through ml_dtypes).

Reading checks the header against the file size, so a truncated or corrupt file fails with a
message naming the file. Writing is planned: the shard headers are computed from the list of
tensors up front, then each tensor is written as it arrives, so memory never holds more than one
tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import ParrotError
from ..model.layout import canonical_key
from ..model.schema import parse_json, show

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024
_MAX_DIMS = 32  # numpy's limit (1.x)

ST_TO_NP = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16),
    "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
}
NP_TO_ST = {v: k for k, v in ST_TO_NP.items()}
NAME_TO_NP = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
NP_TO_NAME = {v: k for k, v in NAME_TO_NP.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def np_dtype(self) -> np.dtype:
        return ST_TO_NP[self.dtype]


def _is_index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class SafetensorsFile:
    """One .safetensors file: its validated header and random access to each tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ParrotError(f"{self.path}: file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ParrotError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise ParrotError(
                    f"{self.path}: corrupt or truncated safetensors file (header of {n} bytes in a "
                    f"{size}-byte file). Download or convert it again."
                )
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise ParrotError(f"{self.path}: corrupt safetensors header ({e})") from None
        except RecursionError:
            raise ParrotError(f"{self.path}: corrupt safetensors header (nested too deeply)") from None
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ParrotError(f"{self.path}: corrupt safetensors header (__metadata__ must map strings to strings)")
        self.metadata = meta
        base = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            info = self._entry(key, entry, base, size)
            if canonical_key(key) in self.tensors:
                raise ParrotError(f"{self.path}: corrupt safetensors header: tensor {key!r} is listed twice")
            self.tensors[canonical_key(key)] = info
        spans = sorted((t.start, t.end, k) for k, t in self.tensors.items() if t.end > t.start)
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise ParrotError(f"{self.path}: corrupt safetensors header: tensors {a!r} and {b!r} overlap")

    def _entry(self, key: str, entry, base: int, size: int) -> TensorInfo:
        """One header entry, checked against the file size before anything is allocated."""
        def corrupt(why: str) -> ParrotError:
            return ParrotError(f"{self.path}: corrupt safetensors header: tensor {key!r} {why}")

        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise corrupt("needs dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ST_TO_NP:
            raise ParrotError(f"{self.path}: tensor {key!r} has unsupported dtype {show(dtype)}")
        if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(_is_index(s) for s in shape):
            raise corrupt(f"has shape {show(shape)}; expected a list of at most {_MAX_DIMS} non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o) for o in offsets):
            raise corrupt(f"has data_offsets {show(offsets)}; expected [begin, end] byte offsets")
        b, e = offsets
        if e - b != math.prod(shape) * ST_TO_NP[dtype].itemsize:
            raise corrupt("has wrong size")
        if base + e > size:
            raise ParrotError(
                f"{self.path}: truncated safetensors file: tensor {key!r} ends at byte {base + e} but the "
                f"file has {size} bytes. Download or convert it again."
            )
        return TensorInfo(dtype, tuple(shape), base + b, base + e)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, key: str) -> np.ndarray:
        info = self.tensors[key]
        buf = np.empty(info.nbytes, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(info.start)
            got = f.readinto(memoryview(buf))
        if got != info.nbytes:
            raise ParrotError(f"{self.path}: truncated while reading tensor {key!r}")
        return buf.view(info.np_dtype).reshape(info.shape)

    def read_all(self) -> dict[str, np.ndarray]:
        return {k: self.read(k) for k in self.tensors}


class CheckpointFiles:
    """The safetensors of a model directory: sharded with an index, one file, or a set of files."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        files: list[Path]
        self.weight_map: dict[str, str] = {}
        if index.is_file():
            raw = parse_json(index.read_bytes(), str(index))
            wm = raw.get("weight_map") if isinstance(raw, dict) else None
            if not isinstance(wm, dict):
                raise ParrotError(f"{index}: malformed index (expected a JSON object with 'weight_map')")
            for k, name in wm.items():
                if not isinstance(name, str) or not name.endswith(".safetensors") or Path(name).name != name:
                    raise ParrotError(f"{index}: malformed index: weight_map gives {k!r} the file {show(name)}; "
                                      "expected a .safetensors file name in the same directory")
            self.weight_map = {canonical_key(k): v for k, v in wm.items()}
            files = [self.directory / name for name in dict.fromkeys(wm.values())]
            for f in files:
                if not f.is_file():
                    raise ParrotError(f"{f}: listed in {INDEX_NAME} but missing. Download it again.")
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise ParrotError(
                    f"{self.directory}: no *.safetensors weights found (pickled .bin weights are not "
                    "loaded; convert them to safetensors first)"
                )
        self.files = {f.name: SafetensorsFile(f) for f in files}
        self.location: dict[str, str] = {}
        for name, sf in self.files.items():
            for k in sf.tensors:
                self.location[k] = name
        for k, name in self.weight_map.items():
            if self.location.get(k) != name:
                raise ParrotError(f"{self.directory / name}: index lists tensor {k!r} but the file lacks it")

    def keys(self) -> list[str]:
        return list(self.location)

    def info(self, key: str) -> TensorInfo:
        return self.files[self.location[key]].tensors[key]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.info(k).shape for k in self.location}

    def read(self, key: str) -> np.ndarray:
        return self.files[self.location[key]].read(key)

    def total_bytes(self) -> int:
        return sum(sf.path.stat().st_size for sf in self.files.values())

    def stored_dtype(self) -> str | None:
        """The floating dtype most of the weights are stored in ('bfloat16', ...), or None."""
        count: dict[str, int] = {}
        for name in self.location:
            info = self.info(name)
            if info.np_dtype in NP_TO_NAME:
                count[NP_TO_NAME[info.np_dtype]] = count.get(NP_TO_NAME[info.np_dtype], 0) + info.nbytes
        return max(count, key=count.get) if count else None


@dataclass(frozen=True)
class TensorSpec:
    key: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class ShardedWriter:
    """Writes planned tensors into shards (`model-00001-of-0000N.safetensors`) plus the index.

    The plan fixes every header before the first byte is written; `write` must then be called once
    per tensor in plan order.
    """

    def __init__(
        self,
        directory: str | Path,
        plan: list[TensorSpec],
        max_shard_bytes: int = 5 * 1024**3,
        metadata: dict[str, str] | None = None,
    ):
        self.directory = Path(directory)
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in plan:
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        n = len(shards)
        self.names = (
            [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.shards = shards
        self.queue: list[tuple[int, TensorSpec]] = [(i, s) for i, sh in enumerate(shards) for s in sh]
        self.pos = 0
        self._file = None
        self._shard = -1
        self.bytes_written = 0

    def _open(self, i: int) -> None:
        if self._file:
            self._file.close()
        offsets, header = 0, {"__metadata__": self.metadata}
        for s in self.shards[i]:
            header[s.key] = {"dtype": NP_TO_ST[s.dtype], "shape": list(s.shape),
                             "data_offsets": [offsets, offsets + s.nbytes]}
            offsets += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.directory / self.names[i], "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = i

    def write(self, key: str, array: np.ndarray) -> None:
        if self.pos >= len(self.queue):
            raise RuntimeError(f"tensor {key!r} is not in the write plan")
        i, spec = self.queue[self.pos]
        if spec.key != key or tuple(array.shape) != spec.shape or array.dtype != spec.dtype:
            raise RuntimeError(
                f"write out of plan: got {key} {array.dtype}{tuple(array.shape)}, "
                f"planned {spec.key} {spec.dtype}{spec.shape}"
            )
        if i != self._shard:
            self._open(i)
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self.bytes_written += spec.nbytes
        self.pos += 1

    def close(self) -> None:
        if self.pos != len(self.queue):
            raise RuntimeError(f"only {self.pos} of {len(self.queue)} planned tensors were written")
        if self._file:
            self._file.close()
            self._file = None
        if len(self.names) > 1:
            weight_map = {s.key: self.names[i] for i, s in self.queue}
            index = {"metadata": {"total_size": sum(s.nbytes for _, s in self.queue)}, "weight_map": weight_map}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def save_tensors(
    tensors: dict[str, np.ndarray], directory: str | Path, max_shard_bytes: int = 5 * 1024**3
) -> list[str]:
    """Writes in-memory numpy tensors as (sharded) safetensors; returns the file names."""
    plan = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    w = ShardedWriter(directory, plan, max_shard_bytes)
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    return w.names


def iter_tensors(files: CheckpointFiles, keys: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, array) one at a time, file by file in stored order."""
    wanted = set(keys) if keys is not None else None
    for sf in files.files.values():
        for k in sorted(sf.tensors, key=lambda k: sf.tensors[k].start):
            if wanted is None or k in wanted:
                yield k, sf.read(k)


def remove_weight_files(directory: str | Path) -> None:
    d = Path(directory)
    for p in list(d.glob("*.safetensors")) + [d / INDEX_NAME]:
        if p.exists():
            os.remove(p)


def save_file(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """One safetensors file from in-memory numpy tensors, written to a temporary file renamed into place."""
    from .fsutil import atomic_output_file

    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    for k, a in arrays.items():
        header[k] = {"dtype": NP_TO_ST[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with atomic_output_file(path, mode="wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for a in arrays.values():
            f.write(a.reshape(-1).view(np.uint8).data)
