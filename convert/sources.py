"""Conversion sources: a directory detected as one of the known kinds, exposed as a list of
official-layout float tensors read lazily, one at a time.

Every kind produces the same thing (`Source`): the validated `Checkpoint` (config, vision tower,
manifest) and `SourceTensor`s in official names and layout, dequantized when stored quantized.
A new kind is one more entry in `parrot.convert.detect.KINDS` (training checkpoints: training_sources.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parrot.errors import ParrotError
from parrot.model.checkpoint import Checkpoint
from parrot.model.layout import (
    MLX_VISION,
    OFFICIAL_VISION,
    QUANT_SUFFIXES,
    mlx_to_official_array,
    mlx_to_official_key,
    mlx_to_official_shape,
    tower_to_official_key,
)
from parrot.storage.safetensors_io import CheckpointFiles

from .quantize import dequantize


@dataclass
class SourceTensor:
    key: str  # official name
    shape: tuple[int, ...]  # official (float) shape
    dtype: np.dtype  # as stored; for a quantized weight, its scales' dtype
    nbytes: int  # bytes read from the source
    read: Callable[[], np.ndarray]  # the official-layout array (dequantized if stored quantized)
    quantized: dict | None = None  # {group_size, bits, mode} when stored quantized


@dataclass
class Source:
    kind: str  # "official" | "mlx" | "deepspeed" | "dcp"
    checkpoint: Checkpoint
    tensors: list[SourceTensor]
    stored: str | None = None  # the tensors' dtype when the checkpoint has no safetensors files to tell
    inputs: list[tuple[str, Path]] = field(default_factory=list)  # other directories read (a run's base model)

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def quantization(self) -> dict | None:
        return self.checkpoint.config.quantization

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def stored_dtype(self) -> str:
        return self.stored or self.checkpoint.stored_dtype()


def has_vision_weights(directory: Path) -> bool:
    """Whether a Parrot directory's safetensors hold the CLIP tower (either layout)."""
    try:
        keys = CheckpointFiles(directory).keys()
    except ParrotError:
        return True  # let the full open report the problem
    return any(k.startswith((OFFICIAL_VISION, MLX_VISION)) for k in keys)


def _module_quantization(q: dict, module: str) -> dict:
    """mlx-lm's per-module override (`quantization[module]` is a dict) or the model-wide entry."""
    own = q.get(module)
    base = {"group_size": q["group_size"], "bits": q["bits"], "mode": q.get("mode", "affine")}
    return {**base, **own} if isinstance(own, dict) else base


def _parrot_dir_tensors(ckpt: Checkpoint) -> list[SourceTensor]:
    out: list[SourceTensor] = []
    q = ckpt.config.quantization or {}
    files = ckpt.files
    for sf in files.files.values():
        for k in sorted(sf.tensors, key=lambda k: sf.tensors[k].start):
            info = sf.tensors[k]
            if ckpt.layout == "official":
                out.append(SourceTensor(k, info.shape, info.np_dtype, info.nbytes, lambda sf=sf, k=k: sf.read(k)))
                continue
            if k.endswith(QUANT_SUFFIXES):
                continue  # read with its weight
            ok = mlx_to_official_key(k)
            module = k.removesuffix(".weight")
            if f"{module}.scales" in files.location:
                mq = _module_quantization(q, module)
                s_info, b_info = files.info(f"{module}.scales"), files.info(f"{module}.biases")

                def read(k=k, module=module, mq=mq) -> np.ndarray:
                    return dequantize(files.read(k), files.read(f"{module}.scales"), files.read(f"{module}.biases"),
                                      mq["group_size"], mq["bits"], mq["mode"])

                shape = (info.shape[0], info.shape[1] * 32 // mq["bits"])
                out.append(SourceTensor(ok, shape, s_info.np_dtype, info.nbytes + s_info.nbytes + b_info.nbytes,
                                        read, mq))
            else:
                out.append(SourceTensor(ok, mlx_to_official_shape(ok, info.shape), info.np_dtype, info.nbytes,
                                        lambda sf=sf, k=k, ok=ok: mlx_to_official_array(ok, sf.read(k))))
    if ckpt.tower_files is not None:  # CLIP weights from the tower directory (used and unused layers)
        known = {**ckpt.manifest.required, **ckpt.manifest.optional}
        tf = ckpt.tower_files
        for k in tf.keys():
            ok = tower_to_official_key(k)
            if ok is not None and ok in known:
                info = tf.info(k)
                out.append(SourceTensor(ok, info.shape, info.np_dtype, info.nbytes, lambda k=k: tf.read(k)))
    return out


def open_parrot_dir(path: Path, vision_tower, description=None) -> Source:
    ckpt = Checkpoint.open(path, vision_tower)
    return Source(ckpt.layout, ckpt, _parrot_dir_tensors(ckpt))
