"""MLX trainer state on disk, without pickle: tensors in safetensors, the rest in JSON.

A checkpoint holds `model.safetensors` (the trainable tensors by MLX name: the stage's set, or the
LoRA adapters), `optimizer.safetensors` (`<name>/m`, `<name>/v`) and `optimizer.json` (step count,
parameter names). Loading refuses a checkpoint that trains another set of parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from parrot.errors import ParrotError
from parrot.storage.fsutil import atomic_output_file

from ..model import ParrotForCausalLM
from .optim import TorchAdamW

BACKEND_MARK = "mlx"  # trainer_state.json's "backend": a torch checkpoint does not resume here


def _read(path: Path) -> dict[str, mx.array]:
    if not path.is_file():
        raise ParrotError(f"{path}: not found (incomplete checkpoint?)")
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as e:
        raise ParrotError(f"{path}: unreadable safetensors ({e})") from None


def save_state(model: ParrotForCausalLM, optimizer: TorchAdamW, directory: Path) -> None:
    trainable = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(directory / "model.safetensors"), trainable)
    moments = {}
    for k, v in tree_flatten(optimizer.state):
        name, leaf = k.rpartition(".")[::2]
        if name in trainable and leaf in ("m", "v"):
            moments[f"{name}/{leaf}"] = v
    mx.save_safetensors(str(directory / "optimizer.safetensors"), moments)
    meta = {"num_steps": optimizer.num_steps, "param_names": sorted(trainable)}
    with atomic_output_file(directory / "optimizer.json") as f:
        json.dump(meta, f, indent=1)


def load_state(model: ParrotForCausalLM, optimizer: TorchAdamW, directory: Path) -> None:
    trainable = dict(tree_flatten(model.trainable_parameters()))
    saved = _read(directory / "model.safetensors")
    if set(saved) != set(trainable):
        missing, extra = sorted(set(trainable) - set(saved)), sorted(set(saved) - set(trainable))
        raise ParrotError(f"{directory}: holds other tensors than this run trains (missing {missing[:3]}, "
                          f"unexpected {extra[:3]}); was it saved with other --stage / --lora settings?")
    for k, v in saved.items():
        if v.shape != trainable[k].shape:
            raise ParrotError(f"{directory}: {k} has shape {tuple(v.shape)}, the model {tuple(trainable[k].shape)}")
    model.load_weights(list(saved.items()), strict=False)
    try:
        meta = json.loads((directory / "optimizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ParrotError(f"{directory / 'optimizer.json'}: unreadable ({e})") from None
    moments = _read(directory / "optimizer.safetensors")
    if meta["param_names"] != sorted(trainable):
        raise ParrotError(f"{directory}: the optimizer state is for other parameters than this run trains")
    optimizer.init(model.trainable_parameters())
    for k in trainable:
        node = optimizer.state
        for part in k.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        node["m"], node["v"] = _moment(moments, f"{k}/m", trainable[k]), _moment(moments, f"{k}/v", trainable[k])
    optimizer.state["step"] = mx.array(meta["num_steps"], mx.uint64)
    optimizer.num_steps = meta["num_steps"]
    mx.eval(model.parameters(), optimizer.state)


def _moment(moments: dict[str, mx.array], key: str, param: mx.array) -> mx.array:
    if key not in moments or moments[key].shape != param.shape:
        raise ParrotError(f"optimizer.safetensors: {key} is missing or mis-shaped (incomplete checkpoint?)")
    return moments[key]
