"""MLX quantization for `parrot convert`: which tensors are quantized, and MLX's affine
quantization applied to numpy arrays one tensor at a time.

Policy (official key names): the LLM's linear layers (q/k/v/o, gate/up/down), `embed_tokens` and
`lm_head` are quantized; the MoE experts when asked; the vision tower, the projector, the MoE
gate, norms and biases stay float. A weight whose input size (last dimension) is not divisible
by the group size stays float. The output follows mlx-lm's convention: `quantization:
{group_size, bits, mode}` in config.json, and a module is quantized exactly when its `.scales`
(and `.biases`) are stored next to its uint32 `.weight`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from parrot.errors import ParrotError
from parrot.model.layout import official_to_mlx_key

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
MODE = "affine"
# Default for the MoE experts, chosen from docs/benchmarks.md ("Quantization accuracy").
QUANTIZE_EXPERTS_DEFAULT = True

_LLM_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
_EXPERT = re.compile(r"^model\.moe_model\.experts\.\d+\.(gate|up|down)_proj\.weight$")
_EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")
_CHUNK_BYTES = 64 * 1024**2  # rows are quantized in blocks of about this size (bounded memory)


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int = 64
    experts: bool = QUANTIZE_EXPERTS_DEFAULT
    embeddings: bool = True  # embed_tokens and lm_head
    mode: str = MODE

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ParrotError(f"--quantize {self.bits}: choose one of {', '.join(map(str, BITS))} bits")
        if self.group_size not in GROUP_SIZES:
            raise ParrotError(f"--group-size {self.group_size}: choose one of {', '.join(map(str, GROUP_SIZES))}")

    def candidate(self, key: str) -> bool:
        """The policy: would this official-layout tensor be quantized, shapes permitting?"""
        if _LLM_LINEAR.match(key):
            return True
        if key in _EMBEDDINGS:
            return self.embeddings
        return bool(self.experts and _EXPERT.match(key))

    def divisible(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and shape[-1] % self.group_size == 0

    def quantized_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int]]:
        """(packed uint32 weight, scales = biases) shapes for a float [out, in] weight."""
        out, inp = shape
        return (out, inp * self.bits // 32), (out, inp // self.group_size)

    def base_entry(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


def module_pattern(official_weight_key: str) -> str:
    """MLX module path with layer / expert numbers as `*` (e.g. language_model.model.layers.*.mlp.up_proj)."""
    path = official_to_mlx_key(official_weight_key).removesuffix(".weight")
    return re.sub(r"\.\d+\.", ".*.", path)


def quantization_record(spec: QuantSpec, quantized: list[str], kept_float: dict[str, str]) -> dict[str, Any]:
    """The config.json `quantization` entry: mlx-lm's keys plus what was (not) quantized and why."""
    return {
        **spec.base_entry(),
        "quantized": sorted(set(quantized)),
        "kept_float": dict(sorted(kept_float.items())),
    }


# ---------------------------------------------------------------- numpy <-> MLX, per tensor
def _to_mx(a: np.ndarray):
    import mlx.core as mx

    if a.dtype.name == "bfloat16":
        return mx.array(np.ascontiguousarray(a).view(np.uint16)).view(mx.bfloat16)
    return mx.array(a)


def _to_np(a) -> np.ndarray:
    import ml_dtypes
    import mlx.core as mx

    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16)).view(ml_dtypes.bfloat16)
    return np.array(a)


def _require_mlx() -> None:
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        raise ParrotError("quantizing and dequantizing need MLX: pip install 'parrot-vlm[mlx]'") from None


def _row_blocks(rows: int, row_bytes: int) -> list[slice]:
    step = max(1, _CHUNK_BYTES // max(row_bytes, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def quantize(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mx.quantize on a float [out, in] array, in row blocks: (uint32 weight, scales, biases)."""
    _require_mlx()
    import mlx.core as mx

    qshape, sshape = spec.quantized_shapes(w.shape)
    wq = np.empty(qshape, np.uint32)
    scales = np.empty(sshape, w.dtype)
    biases = np.empty(sshape, w.dtype)
    for rows in _row_blocks(w.shape[0], w.shape[1] * w.itemsize):
        q, s, b = mx.quantize(_to_mx(w[rows]), group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
        wq[rows], scales[rows], biases[rows] = _to_np(q), _to_np(s), _to_np(b)
    return wq, scales, biases


def dequantize(wq: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int, bits: int,
               mode: str = MODE) -> np.ndarray:
    """mx.dequantize, in row blocks: the float [out, in] weight in the scales' dtype."""
    _require_mlx()
    import mlx.core as mx

    out = np.empty((wq.shape[0], wq.shape[1] * 32 // bits), scales.dtype)
    for rows in _row_blocks(out.shape[0], out.shape[1] * out.itemsize):
        w = mx.dequantize(_to_mx(wq[rows]), _to_mx(scales[rows]), _to_mx(biases[rows]),
                          group_size=group_size, bits=bits, mode=mode)
        out[rows] = _to_np(w)
    return out
