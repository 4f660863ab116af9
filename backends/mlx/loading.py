"""Load an MLX-layout (float or quantized) or official-layout directory into the MLX model."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from parrot.errors import ParrotError
from parrot.model.checkpoint import Checkpoint
from parrot.model.layout import QUANT_SUFFIXES, mlx_to_official_key, official_to_mlx_array, official_to_mlx_key

from .model import ParrotForCausalLM

MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def to_mx(a: np.ndarray) -> mx.array:
    if a.dtype.name == "bfloat16":
        return mx.array(np.ascontiguousarray(a).view(np.uint16)).view(mx.bfloat16)
    return mx.array(a)


def to_np(a: mx.array) -> np.ndarray:
    """A numpy copy; bf16 comes back as ml_dtypes.bfloat16."""
    import ml_dtypes

    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16)).view(ml_dtypes.bfloat16)
    return np.array(a)


def mlx_weights(ckpt: Checkpoint) -> dict[str, mx.array]:
    """Used tensors, in MLX names, from either layout (MLX files through mx.load: quantized ok)."""
    used = ckpt.manifest.required
    out: dict[str, mx.array] = {}
    if ckpt.layout == "mlx":
        for sf in ckpt.files.files.values():
            for k, v in mx.load(str(sf.path)).items():
                base = k
                for suf in QUANT_SUFFIXES:
                    if k.endswith(suf):
                        base = k[: -len(suf)] + ".weight"
                if mlx_to_official_key(base) in used:
                    out[k] = v
    else:
        for k, a in ckpt.iter_official(used_only=True):
            out[official_to_mlx_key(k)] = to_mx(official_to_mlx_array(k, a))
    if ckpt.tower_files is not None and ckpt.layout == "mlx":
        for k, a in ckpt.iter_tower(used_only=True):
            out[official_to_mlx_key(k)] = to_mx(official_to_mlx_array(k, a))
    return out


def quantize_like(model: ParrotForCausalLM, weights: dict[str, mx.array], quantization: dict) -> None:
    """Quantizes exactly the modules whose `.scales` the weights hold (mlx-lm's convention), with
    the model-wide {group_size, bits, mode} or a module's own entry (`quantization[path]`)."""
    gs, bits = quantization["group_size"], quantization["bits"]
    mode = quantization.get("mode", "affine")

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not (hasattr(module, "to_quantized") and f"{path}.scales" in weights):
            return False
        own = quantization.get(path)
        return own if isinstance(own, dict) else True

    nn.quantize(model, group_size=gs, bits=bits, mode=mode, class_predicate=predicate)


def load_mlx_model(ckpt: Checkpoint, dtype: str = "float32") -> ParrotForCausalLM:
    model = ParrotForCausalLM(ckpt.config, ckpt.tower.config)
    weights = mlx_weights(ckpt)
    weights = {k: v for k, v in weights.items()
               if not (ckpt.config.tie_word_embeddings and k == "language_model.lm_head.weight")}
    if ckpt.quantized:
        quantize_like(model, weights, ckpt.config.quantization)
    model.set_dtype(MX_DTYPES[dtype])
    want = dict(tree_flatten(model.parameters()))
    missing = [k for k in want if k not in weights]
    if missing:
        raise ParrotError(f"{ckpt.path}: no weights for {missing[:3]}")
    fdt = MX_DTYPES[dtype]
    cast = [(k, v.astype(fdt) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()]
    model.load_weights(cast, strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model
