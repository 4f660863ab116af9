"""The MLX model of a run's `ModelSource`, its trainable set (the stage's, or LoRA adapters), and
gradient checkpointing applied from outside the model code.

Modules the source lacks (a new model's projector and MoE) keep MLX's default init, which draws
from the same distributions as torch's nn.Linear default (uniform +-1/sqrt(fan_in)).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from parrot.errors import ParrotError
from parrot.model.layout import official_to_mlx_array, official_to_mlx_key
from parrot.training.adapter import full_modules, init_lora, target_modules
from parrot.training.config import TrainConfig
from parrot.training.source import ModelSource

from ..loading import MX_DTYPES, mlx_weights, quantize_like, to_mx
from ..lora import apply_lora
from ..model import ParrotForCausalLM


def build_model(src: ModelSource, seed: int) -> ParrotForCausalLM:
    """float32 model (a quantized base keeps its quantized layers): source weights, new modules at
    MLX's default init (seeded)."""
    cfg, vision = src.config, src.tower.config
    mx.random.seed(seed)
    model = ParrotForCausalLM(cfg, vision)
    ckpt = src.checkpoint
    if ckpt is not None and ckpt.quantized:
        weights = mlx_weights(ckpt)
        quantize_like(model, weights, cfg.quantization)
    else:
        weights = {official_to_mlx_key(k): to_mx(official_to_mlx_array(k, a)) for k, a in src.weights()}
    new = tuple(f"{name}." for name in src.new_modules)
    weights = {k: v for k, v in weights.items() if not k.startswith(new)
               and not (cfg.tie_word_embeddings and k == "language_model.lm_head.weight")}
    params = dict(tree_flatten(model.parameters()))
    missing = [k for k in params if k not in weights and not k.startswith(new)]
    if missing:
        raise ParrotError(f"{src.description}: no weights for {missing[:3]}")
    cast = [(k, v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()
            if k in params]
    model.load_weights(cast, strict=False)
    mx.eval(model.parameters())
    return model


def set_trainable(model: ParrotForCausalLM, tc: TrainConfig) -> list[str]:
    """Without --lora, the torch backend's set: stage 1 the projector; stage 2 projector, MoE (unless
    bypassed) and LLM; the vision tower if asked. With --lora: the adapters (initial weights from
    parrot.training.adapter.init_lora, as on torch) plus the projector and MoE fully (their float
    layers; none with --lora-only). Returns the LoRA module paths (empty without --lora)."""
    model.freeze()
    if tc.lora:
        modules = target_modules(model.config, tc.lora_targets, tc.lora_layers)
        apply_lora(model, modules, tc.lora_rank, tc.lora_scale, tc.lora_dropout)
        found = dict(model.named_modules())
        shapes = {m: (found[m].lora_a.shape[0], found[m].lora_b.shape[1]) for m in modules}
        init = init_lora(shapes, tc.lora_rank, tc.seed)
        model.load_weights([(k, mx.array(v)) for k, v in init.items()], strict=False)
        full = tuple(f"{n}." for n in full_modules(model.config, tc.lora_targets, tc.lora_only))
        for path, m in found.items():
            if path.startswith(full) and isinstance(m, nn.Linear) and not isinstance(m, nn.QuantizedLinear):
                m.unfreeze(recurse=False)
        return modules
    for layer in model.mm_projector:
        layer.unfreeze()
    if tc.stage == 2:
        model.language_model.unfreeze()
        if tc.use_moe and "moe_model" in model:
            model.moe_model.unfreeze()
    if tc.train_vision:
        model.vision_tower.unfreeze()
    return []


def cast_frozen(model: ParrotForCausalLM, dtype: str) -> None:
    """Frozen float weights in the compute dtype; trainable ones stay float32 (master weights)."""
    if dtype == "float32":
        return
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    target = MX_DTYPES[dtype]
    frozen = [(k, v.astype(target)) for k, v in tree_flatten(model.parameters())
              if k not in trainable and mx.issubdtype(v.dtype, mx.floating)]  # quantized scales/biases too
    model.load_weights(frozen, strict=False)


def _part(name: str) -> str:
    if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b"):
        return "LoRA"
    return ("vision tower" if name.startswith("vision_tower.") else "projector" if name.startswith("mm_projector.")
            else "MoE" if name.startswith("moe_model.") else "LLM")


def num_parameters(model: ParrotForCausalLM) -> int:
    """Parameter count, a quantized weight counted at its float size (scales and biases not counted)."""
    n = 0
    for _, m in model.named_modules():
        for k, v in m.parameters().items():
            if not isinstance(v, mx.array):
                continue
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
                if k == "weight":
                    n += v.size * 32 // m.bits
                elif k == "bias":
                    n += v.size
            else:
                n += v.size
    return n


def trainable_summary(model: ParrotForCausalLM) -> str:
    groups: dict[str, int] = {}
    for name, v in tree_flatten(model.trainable_parameters()):
        groups[_part(name)] = groups.get(_part(name), 0) + v.size
    n, total = sum(groups.values()), num_parameters(model)
    parts = ", ".join(f"{k} {v:,}" for k, v in groups.items())
    return f"trainable parameters: {n:,} of {total:,} ({100 * n / max(total, 1):.2f}%: {parts})"


_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(base: type) -> type:
    if base not in _CHECKPOINTED:
        def __call__(self, *args, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                return base.__call__(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        _CHECKPOINTED[base] = type(base.__name__, (base,), {"__call__": __call__, "grad_checkpoint": True})
    return _CHECKPOINTED[base]


def enable_grad_checkpoint(model: ParrotForCausalLM) -> None:
    """Recompute each Qwen2 decoder layer (and CLIP layer when it trains) in the backward pass.

    Only these instances change class (mlx-lm's grad_checkpoint patches the class for every model)."""
    layers = list(model.language_model.model.layers)
    if tree_flatten(model.vision_tower.trainable_parameters()):
        layers += list(model.vision_tower.vision_model.encoder.layers)
    for layer in layers:
        layer.__class__ = _checkpointed_class(type(layer))
