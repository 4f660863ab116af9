"""Official-layout (or MLX-layout, float) checkpoints into the torch model, tensor by tensor."""

from __future__ import annotations

import numpy as np
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from parrot.errors import ParrotError
from parrot.model.checkpoint import Checkpoint
from parrot.model.config import ParrotConfig, VisionConfig
from parrot.training.adapter import Adapter, fuse_official

from .model import ParrotForCausalLM

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy; bf16 comes back as ml_dtypes.bfloat16."""
    import ml_dtypes

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


def reset_buffers(model: ParrotForCausalLM, device: torch.device) -> None:
    """Recreates the non-persistent buffers (rotary inv_freq, CLIP position ids) after `to_empty`."""
    qm = model.model
    qm.rotary_emb = Qwen2RotaryEmbedding(config=qm.config).to(device)  # float32 inv_freq
    emb = qm.vision_tower.vision_tower.vision_model.embeddings
    emb.position_ids = torch.arange(emb.num_positions, device=device).expand((1, -1))


def empty_model(cfg: ParrotConfig, vision: VisionConfig, device: str | torch.device, dtype: torch.dtype):
    """The model with uninitialized weights on `device` (no time spent on random init)."""
    with torch.device("meta"):
        model = ParrotForCausalLM(cfg, vision)
    model = model.to(dtype=dtype).to_empty(device=device)
    reset_buffers(model, torch.device(device))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_torch_model(ckpt: Checkpoint, device: str = "cpu", dtype: str = "float32",
                     adapter: Adapter | None = None) -> ParrotForCausalLM:
    """The model in `dtype`; a LoRA adapter is merged into the weights (W + scale (A B)^T, in float32)."""
    tdtype = TORCH_DTYPES[dtype]
    model = empty_model(ckpt.config, ckpt.tower.config, device, tdtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = set()
    weights = ckpt.iter_official(used_only=True)
    for key, arr in (weights if adapter is None else fuse_official(weights, adapter)):
        if key not in params:
            continue  # e.g. lm_head of a tied model
        p = params[key]
        with torch.no_grad():
            p.copy_(to_torch(arr).to(dtype=tdtype))
        loaded.add(key)
    missing = [k for k in params if k not in loaded and not (ckpt.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing:
        raise ParrotError(f"{ckpt.path}: no weights for {missing[:3]}")
    model.eval()
    return model

