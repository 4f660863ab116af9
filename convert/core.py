"""Streaming layout conversion (float): official <-> MLX, tensor by tensor, into a temporary
directory renamed into place at the end. Every tensor the source holds is carried (the unused CLIP
layer too), so official -> MLX -> official is bit-exact."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from parrot.checkpoint import Checkpoint
from parrot.config import DTYPES
from parrot.errors import ParrotError
from parrot.fsutil import atomic_output_dir
from parrot.layout import (
    mlx_to_official_array,
    mlx_to_official_key,
    mlx_to_official_shape,
    official_to_mlx_array,
    official_to_mlx_key,
    official_to_mlx_shape,
    tower_to_official_key,
)
from parrot.safetensors_io import NAME_TO_NP, ShardedWriter, TensorSpec
from parrot.tokenizer import copy_tokenizer_files

TARGETS = ("mlx", "hf")


_FLOATS = {*NAME_TO_NP.values(), np.dtype(np.float64)}


def _cast(a: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    if dtype is None or a.dtype == dtype or a.dtype not in _FLOATS:
        return a
    return a.astype(dtype)


def _sources(ckpt: Checkpoint) -> list[tuple[str, str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]:
    """(official key, source key, official shape, stored dtype, reader) for every tensor to carry."""
    out = []
    for sf in ckpt.files.files.values():
        for k in sorted(sf.tensors, key=lambda k: sf.tensors[k].start):
            info = sf.tensors[k]
            if ckpt.layout == "mlx":
                ok = mlx_to_official_key(k)
                out.append((ok, k, mlx_to_official_shape(ok, info.shape), info.np_dtype,
                            lambda sf=sf, k=k, ok=ok: mlx_to_official_array(ok, sf.read(k))))
            else:
                out.append((k, k, info.shape, info.np_dtype, lambda sf=sf, k=k: sf.read(k)))
    if ckpt.tower_files is not None:
        known = {**ckpt.manifest.required, **ckpt.manifest.optional}
        tf = ckpt.tower_files
        for k in tf.keys():
            ok = tower_to_official_key(k)
            if ok is not None and ok in known:
                info = tf.info(k)
                out.append((ok, k, info.shape, info.np_dtype, lambda k=k: tf.read(k)))
    return out


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    to: str = "mlx",
    dtype: str | None = None,
    force: bool = False,
    vision_tower: str | Path | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Converts a Parrot directory (either layout) to `to` ('mlx' or 'hf' = official layout).

    dtype: float32 / float16 / bfloat16; None keeps each tensor's stored dtype.
    progress: called with the number of source bytes just processed.
    """
    if to not in TARGETS:
        raise ParrotError(f"unknown target {to!r}; choose mlx or hf")
    if dtype is not None and dtype not in DTYPES:
        raise ParrotError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    ckpt = Checkpoint.open(src, vision_tower)
    if ckpt.quantized:
        raise ParrotError(f"{src}: quantized weights; this conversion handles float models only")
    target_dtype = NAME_TO_NP[dtype] if dtype else None
    sources = _sources(ckpt)
    plan = []
    for ok, _, shape, sdt, _ in sources:
        out_dt = target_dtype if target_dtype is not None and sdt in _FLOATS else sdt
        key, shp = (official_to_mlx_key(ok), official_to_mlx_shape(ok, shape)) if to == "mlx" else (ok, shape)
        plan.append(TensorSpec(key, np.dtype(out_dt), tuple(shp)))
    cfg = ckpt.config
    cfg.vision_config = ckpt.tower.config
    if dtype:
        cfg.torch_dtype = dtype
    with atomic_output_dir(dst, force=force) as tmp:
        writer = ShardedWriter(tmp, plan, max_shard_bytes)
        for (ok, _, shape, sdt, read), spec in zip(sources, plan):
            a = _cast(read(), target_dtype)
            a = official_to_mlx_array(ok, a) if to == "mlx" else a
            writer.write(spec.key, a)
            if progress:
                progress(int(np.prod(shape)) * sdt.itemsize)
        writer.close()
        cfg.save(tmp, layout="mlx")  # official readers ignore the extra vision_config
        ckpt.tower.image.save(tmp)
        copy_tokenizer_files(ckpt.path, tmp)
    return Path(dst)
