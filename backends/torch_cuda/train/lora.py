"""LoRA / QLoRA on the torch model through PEFT (the field's library): the adapted layers are PEFT's
`lora.Linear` (`lora.Linear4bit` on a bitsandbytes NF4 base with --quantize 4), injected into our
model with `peft.inject_adapter_in_model`; the names are the official keys, so the saved adapter is
what PEFT itself writes and loads.

The initial weights come from `parrot.training.adapter.init_lora` (the run's seed, as on MLX); PEFT's
scaling is set to the exact `--lora-scale`. Beside the adapters the projector and the MoE train fully
unless --lora-only (LLaVA's LoRA recipe).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from parrot.errors import ParrotError
from parrot.model.layout import official_to_mlx_key
from parrot.training.adapter import full_modules, init_lora, target_modules
from parrot.training.config import TrainConfig
from parrot.training.peft_format import peft_module

from ..model import ParrotForCausalLM

ADAPTER = "default"  # PEFT's adapter name


def apply_lora(model: ParrotForCausalLM, tc: TrainConfig) -> list[str]:
    """Injects the adapters (and quantizes the LLM's linear layers with --quantize 4), sets the trainable
    set; returns the adapted modules' MLX paths (the adapter's vocabulary)."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = model.config
    modules = target_modules(cfg, tc.lora_targets, tc.lora_layers)
    names = {m: peft_module(m) for m in modules}
    found = dict(model.named_modules())
    for n in names.values():
        if not isinstance(found.get(n), nn.Linear):
            raise ParrotError(f"LoRA target {n}: not a linear layer of this model ({type(found.get(n)).__name__})")
    if tc.quantize:
        quantize_llm_nf4(model)
    config = LoraConfig(r=tc.lora_rank, lora_alpha=tc.lora_scale * tc.lora_rank, lora_dropout=tc.lora_dropout,
                        target_modules=sorted(names.values()), bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model.requires_grad_(False)
    found = dict(model.named_modules())
    shapes = {m: (found[n].in_features, found[n].out_features) for m, n in names.items()}
    init = init_lora(shapes, tc.lora_rank, tc.seed)
    with torch.no_grad():
        for m, n in names.items():
            layer = found[n]
            layer.scaling[ADAPTER] = tc.lora_scale  # exactly mlx-lm's scale (alpha / r may round)
            for part, key in (("lora_A", "lora_a"), ("lora_B", "lora_b")):
                w = getattr(layer, part)[ADAPTER].weight
                w.copy_(torch.from_numpy(np.ascontiguousarray(init[f"{m}.{key}"].T)).to(w))
                w.requires_grad_(True)
    for name in full_modules(cfg, tc.lora_targets, tc.lora_only):
        getattr(model.model, name).requires_grad_(True)
    return modules


def quantize_llm_nf4(model: ParrotForCausalLM) -> None:
    """QLoRA's base: every linear layer of the LLM's decoder layers as a bitsandbytes NF4 Linear4bit
    (bfloat16 compute); quantized when the model moves to the GPU."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ParrotError("--quantize 4 needs bitsandbytes: pip install 'parrot-vlm[qlora]'") from None
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", device="cpu")
                q.weight = bnb.nn.Params4bit(lin.weight.data.to("cpu", torch.float16), requires_grad=False,
                                             quant_type="nf4")
                if lin.bias is not None:
                    q.bias = nn.Parameter(lin.bias.data.to("cpu"), requires_grad=False)
                setattr(parent, name, q)


def adapter_tensors(model: ParrotForCausalLM, modules: list[str]) -> tuple[dict, dict]:
    """(LoRA pairs, fully trained tensors) as float32 numpy arrays by MLX name (A [in, r], B [r, out])."""
    found = dict(model.named_modules())
    weights = {}
    for m in modules:
        layer = found[peft_module(m)]
        weights[f"{m}.lora_a"] = _np(layer.lora_A[ADAPTER].weight).T.copy()
        weights[f"{m}.lora_b"] = _np(layer.lora_B[ADAPTER].weight).T.copy()
    full = {official_to_mlx_key(n): _np(p) for n, p in model.named_parameters()
            if p.requires_grad and ".lora_" not in n}
    return weights, full


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float32).numpy()
