"""A Parrot model directory (official or MLX layout), validated before any weight is read."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ParrotError
from ..storage.safetensors_io import CheckpointFiles
from .config import ParrotConfig
from .layout import (
    OFFICIAL_VISION,
    QUANT_SUFFIXES,
    detect_layout,
    mlx_to_official_array,
    mlx_to_official_key,
    mlx_to_official_shape,
    tower_to_official_key,
)
from .manifest import Manifest, build_manifest, validate
from .tower import ResolvedTower, resolve_vision_tower


@dataclass
class Checkpoint:
    path: Path
    config: ParrotConfig
    tower: ResolvedTower
    files: CheckpointFiles
    layout: str  # "official" | "mlx"
    manifest: Manifest
    tower_files: CheckpointFiles | None  # CLIP weights from the tower directory, when the checkpoint has none

    @classmethod
    def open(cls, path: str | Path, vision_tower=None) -> Checkpoint:
        path = Path(path)
        if not path.exists():
            raise ParrotError(f"{path}: model directory not found")
        if not path.is_dir():
            raise ParrotError(f"{path}: not a directory (a Parrot model is a directory with config.json)")
        cfg = ParrotConfig.from_file(path / "config.json")
        files = CheckpointFiles(path)
        layout = detect_layout(files.keys())
        tower = resolve_vision_tower(cfg, path, vision_tower)
        if cfg.vision_config is None:
            cfg.vision_config = tower.config
        manifest = build_manifest(cfg, tower.config, with_vision=True)
        shapes = official_shapes(files, layout, cfg)
        has_vision = any(k.startswith(OFFICIAL_VISION) for k in shapes)
        tower_files = None
        if not has_vision:
            tower_files = _tower_weights(tower, path)
            for k, s in tower_files.shapes().items():
                ok = tower_to_official_key(k)
                if ok is not None and ok in manifest.required | manifest.optional:
                    shapes[ok] = s
        validate(shapes, manifest, str(path))
        if layout == "mlx" and cfg.quantization:
            check_quantization_record(files, cfg.quantization, path)
        return cls(path, cfg, tower, files, layout, manifest, tower_files)

    @property
    def quantized(self) -> bool:
        return bool(self.config.quantization)

    def stored_dtype(self) -> str:
        return self.files.stored_dtype() or self.config.torch_dtype

    def iter_official(self, used_only: bool = True) -> Iterator[tuple[str, np.ndarray]]:
        """Official-layout float tensors, one at a time (tower-directory CLIP weights included)."""
        if self.quantized:
            raise ParrotError(f"{self.path}: quantized MLX weights; dequantize them with `parrot convert --to hf`")
        keep = self.manifest.required if used_only else None
        for k in self.files.keys():
            ok = mlx_to_official_key(k) if self.layout == "mlx" else k
            if keep is not None and ok not in keep:
                continue
            a = self.files.read(k)
            yield ok, (mlx_to_official_array(ok, a) if self.layout == "mlx" else a)
        yield from self.iter_tower(used_only)

    def iter_tower(self, used_only: bool = True) -> Iterator[tuple[str, np.ndarray]]:
        """CLIP weights from the tower directory (official names), when the checkpoint has none."""
        if self.tower_files is None:
            return
        known = self.manifest.required if used_only else {**self.manifest.required, **self.manifest.optional}
        for k in self.tower_files.keys():
            ok = tower_to_official_key(k)
            if ok is not None and ok in known:
                yield ok, self.tower_files.read(k)


def official_shapes(files: CheckpointFiles, layout: str, cfg: ParrotConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor's official name and float shape (quantized MLX weights mapped back)."""
    shapes = files.shapes()
    if layout == "official":
        return shapes
    q = cfg.quantization or {}
    out: dict[str, tuple[int, ...]] = {}
    for k, s in shapes.items():
        if k.endswith(QUANT_SUFFIXES):
            continue
        ok = mlx_to_official_key(k)
        base = k[: -len(".weight")] if k.endswith(".weight") else None
        if base is not None and f"{base}.scales" in shapes:
            own = q.get(base)  # mlx-lm's per-module override
            bits = own.get("bits") if isinstance(own, dict) and own.get("bits") else q.get("bits")
            if not bits:
                raise ParrotError(f"{files.directory}: {k} is quantized but config.json has no quantization entry")
            s = (*s[:-1], s[-1] * 32 // bits)
        out[ok] = mlx_to_official_shape(ok, s)
    return out


def check_quantization_record(files: CheckpointFiles, q: dict, source: Path) -> None:
    """When config.json lists the quantized modules (`parrot convert` does), the weights must agree."""
    patterns = q.get("quantized")
    if not isinstance(patterns, list):
        return
    have = sorted(k.removesuffix(".scales") for k in files.keys() if k.endswith(".scales"))
    for m in have:
        if not any(fnmatch.fnmatchcase(m, p) for p in patterns):
            raise ParrotError(f"{source}: {m} is stored quantized, but config.json's quantization entry omits it")
    for p in patterns:
        if not any(fnmatch.fnmatchcase(m, p) for m in have):
            raise ParrotError(f"{source}: config.json records {p} as quantized but the weights hold no {p}.scales")


def _tower_weights(tower: ResolvedTower, model_dir: Path) -> CheckpointFiles:
    if tower.directory is None:
        raise ParrotError(
            f"{model_dir}: the checkpoint has no vision tower weights (model.vision_tower.*) and the tower "
            f"({tower.source}) is not a local directory. Download the CLIP tower and pass --vision-tower DIR "
            "(Python: vision_tower=DIR)."
        )
    try:
        tf = CheckpointFiles(tower.directory)
    except ParrotError as e:
        raise ParrotError(
            f"{model_dir}: the checkpoint has no vision tower weights and the tower directory "
            f"{tower.directory} has none usable: {e}"
        ) from None
    if not any(k.startswith("vision_model.") for k in tf.keys()):
        raise ParrotError(f"{tower.directory}: no CLIP vision weights (vision_model.*) in its safetensors")
    return tf
