"""LoRA on the MLX model with mlx-lm's LoRALinear (a quantized base layer stays quantized: QLoRA).

`apply_lora` wraps the named modules; `apply_adapter` rebuilds a saved adapter on a loaded model
(`parrot.load(..., adapter=DIR)`); `lora_weights` are what `adapters.safetensors` holds.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from parrot.errors import ParrotError
from parrot.training.adapter import Adapter

from .mlxlm import LoRALinear
from .model import ParrotForCausalLM

LORA_LEAVES = ("lora_a", "lora_b")


def apply_lora(model: ParrotForCausalLM, modules: list[str], rank: int, scale: float, dropout: float) -> None:
    """Replaces each named Linear / QuantizedLinear by a LoRALinear around it (A random, B zero)."""
    found = dict(model.named_modules())
    wrapped = []
    for path in modules:
        m = found.get(path)
        if not isinstance(m, (nn.Linear, nn.QuantizedLinear)):
            raise ParrotError(f"LoRA target {path}: not a linear layer of this model ({type(m).__name__})")
        wrapped.append((path, LoRALinear.from_base(m, r=rank, dropout=dropout, scale=scale)))
    model.update_modules(tree_unflatten(wrapped))


def lora_weights(model: ParrotForCausalLM) -> dict[str, mx.array]:
    """Every LoRA tensor of the model by name (`<module>.lora_a`, `<module>.lora_b`)."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in LORA_LEAVES}


def apply_adapter(model: ParrotForCausalLM, adapter: Adapter) -> None:
    """Rebuilds a saved adapter (parrot.training.adapter.read_adapter, checked against the base) on a loaded model."""
    apply_lora(model, adapter.modules, adapter.rank, adapter.scale, adapter.dropout)
    tensors = {**adapter.weights, **adapter.full}  # full: the fully trained projector / MoE tensors
    model.load_weights([(k, mx.array(np.asarray(v, np.float32))) for k, v in tensors.items()], strict=False)
    mx.eval(model.parameters())
    model.eval()
