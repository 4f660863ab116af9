"""Conversion source for a one-process training checkpoint (`parrot train` without --deepspeed / --fsdp, torch
or MLX): `OUTPUT/checkpoints/step-N/` holds only the trainable tensors (`model.safetensors`, torch names =
official names, or MLX names) beside the optimizer state.

The full model is the run's source model (`--model`, or `--llm` + `--vision-tower`, as recorded in the
checkpoint's run_config.json) overlaid with the checkpoint's trained tensors, cast to the run's dtype:
exactly what the trainer would export at that step. The model description (config.json, tokenizer,
preprocessor settings) is `--config DIR`, else `step-N/model/` (written by the trainer), else the run's
source model's. A stage-1 checkpoint of a new model (`--llm`) lacks the MoE (never trained, bypassed):
the output then has no MoE weights, and a stage 2 started from it initializes the MoE as the official
code does. LoRA checkpoints hold adapters only: they are refused (fuse the run's final adapter instead).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np

from parrot.errors import ParrotError
from parrot.model.checkpoint import Checkpoint
from parrot.model.config import ParrotConfig
from parrot.model.layout import mlx_to_official_array, mlx_to_official_key, mlx_to_official_shape, tower_to_official_key
from parrot.model.manifest import build_manifest, validate
from parrot.model.tower import resolve_vision_tower
from parrot.storage.safetensors_io import NAME_TO_NP, CheckpointFiles, SafetensorsFile
from parrot.training.config import TrainConfig
from parrot.training.run_dir import MODEL_DIR, STATE_NAME, read_json
from parrot.training.source import ModelSource, open_source

from .sources import Source, SourceTensor, _parrot_dir_tensors

_FILES = (STATE_NAME, "model.safetensors", "optimizer.json", "run_config.json")


def is_run_checkpoint(path: Path) -> bool:
    return all((path / name).is_file() for name in _FILES)


def _run_config(path: Path, vision_tower) -> TrainConfig:
    saved = read_json(path / "run_config.json")
    try:
        tc = TrainConfig.from_dict(saved["config"])
    except (KeyError, TypeError) as e:
        raise ParrotError(f"{path / 'run_config.json'}: not a parrot train run config ({e})") from None
    if tc.lora:
        raise ParrotError(f"{path}: a LoRA checkpoint holds adapter weights only. Fuse the run's final adapter "
                          f"instead: parrot convert {tc.model} DST --fuse-adapter {tc.output}")
    return dataclasses.replace(tc, vision_tower=str(vision_tower)) if vision_tower is not None else tc


def _open_base(path: Path, tc: TrainConfig) -> ModelSource:
    what = f"--model {tc.model}" if tc.model is not None else f"--llm {tc.llm} with --vision-tower {tc.vision_tower}"
    try:
        return open_source(tc)
    except ParrotError as e:
        raise ParrotError(f"{path}: the checkpoint holds only the trained tensors; the others come from the run's "
                          f"source model ({what}, recorded in run_config.json), which does not open: {e}") from None


def _base_tensors(src: ModelSource, tc: TrainConfig) -> dict[str, SourceTensor]:
    """The source model's tensors by official name, read lazily."""
    if src.checkpoint is not None:
        return {t.key: t for t in _parrot_dir_tensors(src.checkpoint)}
    out: dict[str, SourceTensor] = {}
    for files, rename in ((CheckpointFiles(tc.llm), lambda k: k),
                          (CheckpointFiles(src.tower.directory), tower_to_official_key)):
        for k in files.keys():
            ok = rename(k)
            if ok is not None:
                info = files.info(k)
                out[ok] = SourceTensor(ok, info.shape, info.np_dtype, info.nbytes, lambda f=files, k=k: f.read(k))
    return out


def _trained_tensors(path: Path, mlx: bool) -> dict[str, SourceTensor]:
    """The checkpoint's trained tensors by official name (MLX names and layouts translated)."""
    sf = SafetensorsFile(path / "model.safetensors")
    out = {}
    for k, info in sf.tensors.items():
        if mlx:
            ok = mlx_to_official_key(k)
            out[ok] = SourceTensor(ok, mlx_to_official_shape(ok, info.shape), info.np_dtype, info.nbytes,
                                   lambda k=k, ok=ok: mlx_to_official_array(ok, sf.read(k)))
        else:
            out[k] = SourceTensor(k, info.shape, info.np_dtype, info.nbytes, lambda k=k: sf.read(k))
    return out


def _description(path: Path, explicit, src: ModelSource, tc: TrainConfig, vision_tower):
    """(config, tower, directory with the tokenizer files)."""
    d = Path(explicit) if explicit is not None else path / MODEL_DIR
    if (d / "config.json").is_file():
        cfg = ParrotConfig.from_file(d / "config.json")
        return cfg, resolve_vision_tower(cfg, d, vision_tower), d
    if explicit is not None:
        raise ParrotError(f"--config {d}: no config.json there (give a Parrot model directory of the same "
                          "architecture, e.g. the run's --model)")
    cfg = dataclasses.replace(src.config, torch_dtype=tc.dtype, quantization=None, extra=dict(src.config.extra))
    cfg.extra.update(tokenizer_model_max_length=tc.max_length, use_cache=True)
    return cfg, src.tower, src.tokenizer_dir


def open_run_checkpoint(path: Path, vision_tower, description=None) -> Source:
    tc = _run_config(path, vision_tower)
    src = _open_base(path, tc)
    state = read_json(path / STATE_NAME)
    trained = _trained_tensors(path, mlx=state.get("backend") == "mlx")
    cfg, tower, desc = _description(path, description, src, tc, vision_tower)
    if cfg.vision_config is None:
        cfg.vision_config = tower.config
    tensors = {**_base_tensors(src, tc), **trained}  # the trained tensors replace the source model's
    if cfg.has_moe and not any(k.startswith("model.moe_model.") for k in tensors):
        cfg.moe_hidden_size = None  # a stage-1 run of a new model: its MoE was never trained nor saved
        warnings.warn(f"{path}: the run's MoE (initialized at random, bypassed in stage 1) is not in the checkpoint; "
                      "the output has no MoE weights (stage 2 initializes them)", UserWarning, stacklevel=3)
    manifest = build_manifest(cfg, tower.config, with_vision=True)
    known = {**manifest.required, **manifest.optional}
    tensors = {k: t for k, t in tensors.items() if k in known or k in trained}  # a trained extra is an error
    validate({k: t.shape for k, t in tensors.items()}, manifest, f"{path} (described by {desc / 'config.json'})")
    dtype, floats = np.dtype(NAME_TO_NP[tc.dtype]), {*NAME_TO_NP.values(), np.dtype(np.float64)}
    for t in tensors.values():  # cast to the run's dtype, as the trainer's export does
        if t.dtype in floats:
            t.dtype = dtype
    ckpt = Checkpoint(desc, cfg, tower, None, "official", manifest, None)
    inputs = [("run's source model", p) for p in (tc.model, tc.llm, src.tower.directory) if p is not None]
    return Source("trainer", ckpt, list(tensors.values()), stored=tc.dtype, inputs=[(k, Path(p)) for k, p in inputs])
