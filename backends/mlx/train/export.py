"""What an MLX run leaves in its output directory at the end.

Full fine-tuning: the consolidated model in the official layout (config, safetensors, tokenizer,
preprocessor settings), exactly what the torch trainer exports: the next stage's `--model`, loadable
by `parrot.load` on every backend. With `save_layout="mlx"` the weights use the MLX layout instead
(also a valid `--model`). LoRA: `adapters.safetensors` + `adapter_config.json` (the base untouched).
Files are written into a temporary directory and moved in with config.json last.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from mlx.utils import tree_flatten

from parrot.model.layout import (
    mlx_to_official_array,
    mlx_to_official_key,
    mlx_to_official_shape,
    official_to_mlx_array,
    official_to_mlx_key,
    official_to_mlx_shape,
)
from parrot.storage.safetensors_io import NAME_TO_NP, ShardedWriter, TensorSpec
from parrot.training.adapter import adapter_config, is_full_tensor, save_adapter
from parrot.training.config import TrainConfig
from parrot.training.source import ModelSource, move_model_into, write_model_description

from ..loading import to_np
from ..lora import lora_weights
from ..model import ParrotForCausalLM

MODEL_DIR = "model"  # a checkpoint's model description (config, tokenizer, preprocessor settings)


def _tensors(model: ParrotForCausalLM, src: ModelSource, dtype: np.dtype,
             layout: str) -> list[tuple[TensorSpec, Callable]]:
    """(spec, read) per output tensor, in `layout`: the model's parameters, then CLIP's unused ones."""
    out = []
    for k, v in tree_flatten(model.parameters()):
        ok = mlx_to_official_key(k)
        if layout == "mlx":
            out.append((TensorSpec(k, dtype, tuple(v.shape)), lambda v=v: to_np(v).astype(dtype)))
        else:
            out.append((TensorSpec(ok, dtype, mlx_to_official_shape(ok, tuple(v.shape))),
                        lambda v=v, ok=ok: mlx_to_official_array(ok, to_np(v)).astype(dtype)))
    for ok, a in src.unused():
        a = a.astype(dtype)
        if layout == "mlx":
            out.append((TensorSpec(official_to_mlx_key(ok), dtype, official_to_mlx_shape(ok, a.shape)),
                        lambda a=a, ok=ok: official_to_mlx_array(ok, a)))
        else:
            out.append((TensorSpec(ok, dtype, tuple(a.shape)), lambda a=a: a))
    return out


def export_model(model: ParrotForCausalLM, src: ModelSource, out: Path, dtype: str, max_length: int,
                 layout: str = "official", max_shard_bytes: int = 5 * 1024**3) -> None:
    """The trained model into `out` (official or MLX layout), in `dtype`; one tensor in memory at a time."""
    tmp = Path(tempfile.mkdtemp(prefix=".export-tmp-", dir=out))
    try:
        tensors = _tensors(model, src, NAME_TO_NP[dtype], layout)
        writer = ShardedWriter(tmp, [s for s, _ in tensors], max_shard_bytes,
                               metadata={"format": "mlx" if layout == "mlx" else "pt"})
        for spec, read in tensors:
            writer.write(spec.key, read())
        writer.close()
        write_model_description(src, tmp, dtype, max_length)
        move_model_into(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_adapter(model: ParrotForCausalLM, src: ModelSource, tc: TrainConfig, modules: list[str], out: Path,
                   steps: int) -> None:
    """adapters.safetensors + adapter_config.json (mlx-lm's names) into `out`, the fully trained
    projector / MoE tensors beside the adapters (as mlx-lm saves every trainable parameter)."""
    weights = {k: to_np(v).astype(np.float32) for k, v in lora_weights(model).items()}
    full = {k: to_np(v).astype(np.float32) for k, v in tree_flatten(model.trainable_parameters())
            if is_full_tensor(k)}
    base = str(src.checkpoint.path if src.checkpoint is not None else tc.model)
    cfg = adapter_config(tc.lora_rank, tc.lora_scale, tc.lora_dropout, tc.lora_alpha, tc.lora_targets, modules,
                         src.config, base, tc.lora_layers,
                         extra={"stage": tc.stage, "use_moe": tc.use_moe, "trained_steps": steps})
    save_adapter(out, cfg, weights, full)
