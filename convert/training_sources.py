"""Conversion sources for training checkpoints: a DeepSpeed ZeRO checkpoint (`--deepspeed` runs) or
a torch.distributed.checkpoint directory (`--fsdp` runs), consolidated tensor by tensor.

Their weights need a model description (config.json, tokenizer, preprocessor settings): `parrot
train` writes one into each checkpoint (`model/`); otherwise the run directory's exported model, or
an explicit `--config DIR` (any Parrot directory of the same architecture, e.g. the run's --model).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from parrot.backends.torch_cuda.dcp_checkpoint import DcpCheckpoint
from parrot.backends.torch_cuda.zero_checkpoint import ZeroCheckpoint, find_tag_dir
from parrot.errors import ParrotError
from parrot.model.checkpoint import Checkpoint
from parrot.model.config import ParrotConfig
from parrot.model.layout import tower_to_official_key
from parrot.model.manifest import build_manifest, validate
from parrot.model.tower import resolve_vision_tower
from parrot.storage.safetensors_io import CheckpointFiles
from parrot.training.run_dir import MODEL_DIR

from .sources import Source, SourceTensor


def is_deepspeed_dir(path: Path) -> bool:
    return find_tag_dir(path) is not None


def description_dir(path: Path, kind: str, explicit: str | Path | None) -> Path:
    """Where SRC's config.json, tokenizer and preprocessor settings are."""
    if explicit is not None:
        d = Path(explicit)
        if not (d / "config.json").is_file():
            raise ParrotError(f"--config {d}: no config.json there (give a Parrot model directory of the same "
                              "architecture, e.g. the run's --model)")
        return d
    step_dir = path.parent if path.name == "deepspeed" else path  # the tag directory itself was given
    for d in (step_dir / MODEL_DIR, step_dir.parent.parent):  # .../OUTPUT/checkpoints/step-N -> OUTPUT
        if (d / "config.json").is_file():
            return d
    raise ParrotError(f"{path}: a {kind} checkpoint holds weights only, and no model description was found "
                      f"({step_dir / MODEL_DIR}/config.json, written by parrot train, is missing). Pass --config DIR: "
                      "a Parrot model directory of the same architecture (e.g. the run's --model).")


def _open(path: Path, vision_tower, description, kind: str, names: list[str], shape: Callable,
          read: Callable) -> Source:
    desc = description_dir(path, kind, description)
    cfg = ParrotConfig.from_file(desc / "config.json")
    tower = resolve_vision_tower(cfg, desc, vision_tower)
    if cfg.vision_config is None:
        cfg.vision_config = tower.config
    manifest = build_manifest(cfg, tower.config, with_vision=True)
    known = {**manifest.required, **manifest.optional}
    # a tied lm_head is an alias of the embeddings (DeepSpeed lists it among its shared parameters)
    keys = [k for k in names if not (k == "lm_head.weight" and k not in known)]
    validate({k: shape(k) for k in keys}, manifest, f"{path} (described by {desc / 'config.json'})")
    ckpt = Checkpoint(desc, cfg, tower, None, "official", manifest, None)
    tensors = []
    for k in keys:
        s = tuple(shape(k))
        tensors.append(SourceTensor(k, s, np.dtype(np.float32), 4 * int(np.prod(s)),
                                    lambda k=k: read(k).float().numpy()))
    tensors += _unused_tower_tensors(tower, manifest, set(keys))
    return Source(kind, ckpt, tensors, stored="float32")


def _unused_tower_tensors(tower, manifest, have: set[str]) -> list[SourceTensor]:
    """CLIP's unused last layer from the tower directory, as the trainer's export carries it (when found)."""
    if tower.directory is None:
        return []
    try:
        tf = CheckpointFiles(tower.directory)
    except ParrotError:
        return []
    out = []
    for k in tf.keys():
        ok = tower_to_official_key(k)
        if ok in manifest.optional and ok not in manifest.required and ok not in have:
            info = tf.info(k)
            out.append(SourceTensor(ok, info.shape, np.dtype(np.float32), info.nbytes,
                                    lambda k=k: tf.read(k).astype(np.float32)))
    return out


def open_deepspeed(path: Path, vision_tower, description=None) -> Source:
    z = ZeroCheckpoint(path)
    return _open(path, vision_tower, description, "deepspeed", z.names(), z.shape, z.read)


def open_dcp(path: Path, vision_tower, description=None) -> Source:
    c = DcpCheckpoint(path)
    return _open(path, vision_tower, description, "dcp", c.names(), c.shape, c.read)
