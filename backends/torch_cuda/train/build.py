"""The torch model of a run's `ModelSource`, with the stage's trainable set.

Modules the source lacks (a new model's projector and MoE) keep torch's default init, as in the
official code. Weights are kept in float32 here (master weights); the strategy decides what to cast.
"""

from __future__ import annotations

import torch
from torch import nn

from parrot.errors import ParrotError
from parrot.training.source import ModelSource

from ..loading import empty_model, to_torch
from ..model import MultilingualMoE, ParrotForCausalLM, build_projector


# ---------------------------------------------------------------- the model
def build_model(src: ModelSource, device: str | torch.device, seed: int) -> ParrotForCausalLM:
    """float32 model on `device`: source weights loaded, new modules at torch's default init (seeded)."""
    cfg, vision = src.config, src.tower.config
    model = empty_model(cfg, vision, device, torch.float32)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    torch.manual_seed(seed)  # the official order: projector first, then the MoE
    fresh = {"mm_projector": lambda: build_projector(cfg), "moe_model": lambda: MultilingualMoE(cfg)}
    for name in src.new_modules:
        module = fresh[name]()
        getattr(model.model, name).load_state_dict(module.state_dict())
        loaded |= {f"model.{name}.{k}" for k, _ in module.named_parameters()}
    with torch.no_grad():
        for key, arr in src.weights():
            if key in params and key not in loaded:
                params[key].copy_(to_torch(arr).to(torch.float32))
                loaded.add(key)
    missing = [k for k in params if k not in loaded and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing:
        raise ParrotError(f"{src.description}: no weights for {missing[:3]}")
    return model


def set_trainable(model: ParrotForCausalLM, stage: int, use_moe: bool, train_vision: bool) -> None:
    """Stage 1: projector. Stage 2: projector, MoE (unless bypassed) and LLM. Vision only if asked."""
    model.requires_grad_(False)
    m = model.model
    m.mm_projector.requires_grad_(True)
    if stage == 2:
        for module in (m.embed_tokens, m.layers, m.norm, model.lm_head):
            module.requires_grad_(True)
        if use_moe and m.moe_model is not None:
            m.moe_model.requires_grad_(True)
    if train_vision:
        m.vision_tower.requires_grad_(True)


def trainable_summary(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = ("LoRA" if ".lora_" in name else "vision tower" if ".vision_tower." in name
                    else "projector" if ".mm_projector." in name else "MoE" if ".moe_model." in name else "LLM")
            groups[part] = groups.get(part, 0) + p.numel()
    n = sum(groups.values())
    parts = ", ".join(f"{k} {v:,}" for k, v in groups.items())
    return f"trainable parameters: {n:,} of {total:,} ({100 * n / max(total, 1):.2f}%: {parts})"


def enable_activation_checkpointing(model: ParrotForCausalLM) -> None:
    """Recompute each Qwen2 decoder layer in the backward pass (applied from outside the model code)."""
    qwen = model.model
    kwargs = {"use_reentrant": False}
    if hasattr(qwen, "activation_checkpointing_enable"):  # transformers >= 5.2x
        qwen.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        qwen.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def packed_attention(model: nn.Module, device: torch.device) -> str:
    """For --packing: flash-attention's varlen kernels on CUDA when flash_attn is installed (transformers reads the
    samples' bounds off the restarting position ids), else SDPA with a block-diagonal causal mask. Says which."""
    import importlib.util

    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        model.model.config._attn_implementation = "flash_attention_2"
        return "flash-attention varlen"
    return "SDPA per sample"
