"""The final consolidated checkpoint, official layout: what the next stage's `--model` is, what
`parrot.load` and `parrot convert` read.

Weights are streamed shard by shard (memory holds one shard), written into a temporary directory and
moved into the output directory with config.json last, so a directory holding a config.json always
holds the complete model. CLIP's unused last layer is carried from the source, as the released
checkpoints hold it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from parrot.storage.fsutil import apply_umask
from parrot.storage.safetensors_io import INDEX_NAME
from parrot.training.adapter import adapter_config, save_adapter
from parrot.training.config import TrainConfig
from parrot.training.source import ModelSource, move_model_into, write_model_description

from ..loading import TORCH_DTYPES, to_torch
from .lora import adapter_tensors
from .strategy import Strategy


def _shards(tensors: Iterator[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for k, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[k] = t
        size += nbytes
    if shard:
        yield shard


def export_model(
    strategy: Strategy, src: ModelSource, out: Path, dtype: str, max_length: int,
    max_shard_bytes: int = 5 * 1024**3,
) -> None:
    """Writes config, safetensors, tokenizer and preprocessor settings into `out` (rank 0)."""
    tdtype = TORCH_DTYPES[dtype]

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for k, t in strategy.export():
            yield k, t.to(device="cpu", dtype=tdtype).contiguous()
        if strategy.rank == 0:
            for k, a in src.unused():
                yield k, to_torch(a).to(tdtype)

    rank0 = strategy.rank == 0
    tmp = Path(tempfile.mkdtemp(prefix=".export-tmp-", dir=out)) if rank0 else None
    try:
        names: list[tuple[str, list[str]]] = []
        for i, shard in enumerate(_shards(tensors(), max_shard_bytes)):
            if rank0:
                save_file(shard, str(tmp / f"shard-{i}.tmp"), metadata={"format": "pt"})
                apply_umask(tmp / f"shard-{i}.tmp")  # safetensors creates it 0600
                names.append((f"shard-{i}.tmp", list(shard)))
        if not rank0:
            return
        n = len(names)
        final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (tmp_name, keys), name in zip(names, final):
            os.replace(tmp / tmp_name, tmp / name)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            total = sum((tmp / f).stat().st_size for f in final)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        write_model_description(src, tmp, dtype, max_length)
        move_model_into(tmp, out)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def export_adapter(model: torch.nn.Module, src: ModelSource, tc: TrainConfig, modules: list[str], out: Path,
                   steps: int) -> None:
    """The adapter in PEFT's format (adapter_model.safetensors + adapter_config.json) into `out`, the fully
    trained projector / MoE tensors as PEFT's modules_to_save; the same record as an MLX run's."""
    weights, full = adapter_tensors(model, modules)
    base = str(src.checkpoint.path if src.checkpoint is not None else tc.model)
    cfg = adapter_config(tc.lora_rank, tc.lora_scale, tc.lora_dropout, tc.lora_alpha, tc.lora_targets, modules,
                         src.config, base, tc.lora_layers,
                         extra={"stage": tc.stage, "use_moe": tc.use_moe, "trained_steps": steps,
                                "quantize": tc.quantize})
    save_adapter(out, cfg, weights, full, fmt="peft")
