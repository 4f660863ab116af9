"""Key names and tensor layouts: official (HF/torch) <-> MLX. The only place layouts are translated.

Official                                              MLX
model.embed_tokens / model.layers / model.norm     -> language_model.model.*
lm_head                                            -> language_model.lm_head
model.vision_tower.vision_tower.vision_model.*     -> vision_tower.vision_model.*
   embeddings.patch_embedding.weight [O, I, H, W]  ->    [O, H, W, I]   (MLX convs are channels-last)
model.mm_projector.N                               -> mm_projector.N
model.moe_model.*                                  -> moe_model.*

Pure numpy; used by the MLX loader and by `parrot.convert`.
"""

from __future__ import annotations

import numpy as np

from ..errors import ParrotError

OFFICIAL_VISION = "model.vision_tower.vision_tower."
MLX_VISION = "vision_tower."
TOWER_VISION = ""  # a CLIP checkpoint's own keys start with "vision_model."
PATCH_EMBED = "vision_model.embeddings.patch_embedding.weight"
QUANT_SUFFIXES = (".scales", ".biases")

_PREFIXES = [  # (official, mlx), most specific first
    (OFFICIAL_VISION, MLX_VISION),
    ("model.mm_projector.", "mm_projector."),
    ("model.moe_model.", "moe_model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.", "language_model.model."),
]


def official_to_mlx_key(key: str) -> str:
    for off, mlx in _PREFIXES:
        if key.startswith(off):
            return mlx + key[len(off):]
    raise ParrotError(f"tensor {key!r} is not a Parrot key (official layout)")


def mlx_to_official_key(key: str) -> str:
    for off, mlx in _PREFIXES:
        if key.startswith(mlx):
            return off + key[len(mlx):]
    raise ParrotError(f"tensor {key!r} is not a Parrot key (MLX layout)")


def _is_patch_embed(key: str) -> bool:
    return key.endswith(PATCH_EMBED)


def official_to_mlx_array(key: str, a: np.ndarray) -> np.ndarray:
    """`key` is the official name."""
    if _is_patch_embed(key) and a.ndim == 4:
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1))
    return a


def mlx_to_official_array(key: str, a: np.ndarray) -> np.ndarray:
    """`key` is the official name."""
    if _is_patch_embed(key) and a.ndim == 4:
        return np.ascontiguousarray(a.transpose(0, 3, 1, 2))
    return a


def official_to_mlx_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if _is_patch_embed(key) and len(shape) == 4:
        return (shape[0], shape[2], shape[3], shape[1])
    return tuple(shape)


def mlx_to_official_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if _is_patch_embed(key) and len(shape) == 4:
        return (shape[0], shape[3], shape[1], shape[2])
    return tuple(shape)


def to_mlx(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {official_to_mlx_key(k): official_to_mlx_array(k, v) for k, v in weights.items()}


def to_official(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in weights.items():
        ok = mlx_to_official_key(k)
        out[ok] = mlx_to_official_array(ok, v)
    return out


_CLIP_TOP = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")


def canonical_key(key: str) -> str:
    """transformers 5 saves a CLIPVisionModel without its `vision_model.` level (`embeddings.*`, and in
    Parrot checkpoints `model.vision_tower.vision_tower.embeddings.*`); put the level back so both
    generations of checkpoints read alike."""
    if key.startswith(OFFICIAL_VISION):
        rest = key[len(OFFICIAL_VISION):]
        if rest.startswith(_CLIP_TOP):
            return OFFICIAL_VISION + "vision_model." + rest
    elif key.startswith(_CLIP_TOP):
        return "vision_model." + key
    return key


def tower_to_official_key(key: str) -> str | None:
    """A CLIP checkpoint key (CLIPVisionModel or CLIPModel) -> official Parrot key; None if not vision."""
    if key.startswith("vision_model."):
        return OFFICIAL_VISION + key
    return None


def detect_layout(keys: list[str]) -> str:
    """'official' or 'mlx', from the tensor names."""
    if any(k.startswith(("language_model.", "vision_tower.", "mm_projector.", "moe_model.")) for k in keys):
        return "mlx"
    if any(k.startswith(("model.", "lm_head.")) for k in keys):
        return "official"
    raise ParrotError("the weights hold neither official-layout nor MLX-layout Parrot keys")
