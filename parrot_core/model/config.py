"""The Parrot model config: reads and writes the official `config.json` (model_type parrot_qwen2).

Both backends and the converters speak these field names. Unknown keys are kept in `extra` and
written back unchanged, so a config survives a round trip through any layout.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ParrotError
from .schema import (
    DTYPES,  # noqa: F401  (re-exported: the CLI's --dtype choices)
    PARROT_CONFIG,
    PARROT_RELATIONS,
    VISION_CONFIG,
    check,
    check_relations,
    parse_json,
    projector_depth,
)

MODEL_TYPE = "parrot_qwen2"
ARCHITECTURE = "ParrotQwen2ForCausalLM"


@dataclass
class VisionConfig:
    """A CLIP vision tower (transformers' CLIPVisionConfig fields)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "vision config", name: str = "") -> VisionConfig:
        """Accepts a CLIPVisionConfig dict or a full CLIPConfig (uses its `vision_config`), checked
        against `schema.VISION_CONFIG`. `source` names the file, `name` the field holding `d` in it."""
        if isinstance(d, dict) and "vision_config" in d:
            d, name = d["vision_config"], f"{name}.vision_config" if name else "vision_config"
        check(d, VISION_CONFIG, source, name)
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        check_relations(asdict(cfg), VISION_CONFIG.relations, source, f"{name}." if name else "")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "clip_vision_model", **asdict(self)}

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1


# Towers released with Parrot and LLaVA: used when `mm_vision_tower` names a hub id that is not
# a local directory (the official config.json does not hold the CLIP config).
KNOWN_VISION_TOWERS: dict[str, VisionConfig] = {
    "openai/clip-vit-large-patch14-336": VisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=768,
    ),
    "openai/clip-vit-large-patch14": VisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768,
    ),
}


@dataclass
class ParrotConfig:
    # Qwen2 LLM
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # transformers' Qwen2Config default; official configs set 1e6
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    # vision tower and projector
    mm_vision_tower: str | None = None
    mm_hidden_size: int = 1024
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "cls_patch"
    image_aspect_ratio: str = "pad"
    mm_patch_merge_type: str = "flat"
    # text-guided MoE (defaults are the official code's getattr fallbacks)
    num_experts: int = 6
    moe_hidden_size: int | None = None
    moe_intermediate_size: int = 4096
    moe_top_k: int = 6
    moe_weight: float = 1.0
    use_moe: bool = True
    use_moe_residual: bool = True
    # resolved CLIP config (written in MLX-layout configs; official configs do not hold it)
    vision_config: VisionConfig | None = None
    # MLX quantization entry ({"group_size", "bits", ...}); None for float models
    quantization: dict | None = None
    # every other key of config.json, written back unchanged
    extra: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- reading
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> ParrotConfig:
        """A config.json dict, every field checked against `schema.PARROT_CONFIG` (type and range),
        then the relations between fields (`schema.PARROT_RELATIONS`)."""
        if not isinstance(d, dict):
            check(d, PARROT_CONFIG, source)  # the message says what the file holds instead
        model_type = d.get("model_type")
        if model_type != MODEL_TYPE:
            raise ParrotError(
                f"{source}: model_type is {model_type!r}, expected {MODEL_TYPE!r}. This is not a Parrot "
                "checkpoint (for a plain Qwen2 LLM use `parrot train --llm DIR`)."
            )
        check(d, PARROT_CONFIG, source)
        d = copy.deepcopy(d)
        d.setdefault("num_key_value_heads", d["num_attention_heads"])

        # rope_theta wherever transformers put it (4.x: top level; 5.x: rope_parameters)
        rope_theta = d.pop("rope_theta", None)
        rp = d.get("rope_parameters")
        if rope_theta is None and isinstance(rp, dict):
            rope_theta = rp.get("rope_theta")
        if rope_theta is None and isinstance(d.get("rope_scaling"), dict):
            rope_theta = d["rope_scaling"].get("rope_theta")
        dtype = d.pop("torch_dtype", None) or d.pop("dtype", None) or "float32"
        d.pop("dtype", None)

        names = {f.name for f in fields(cls)} - {"extra", "vision_config", "rope_theta", "torch_dtype"}
        kwargs = {k: d.pop(k) for k in list(d) if k in names}
        vc = d.pop("vision_config", None)
        cfg = cls(
            **kwargs,
            rope_theta=float(rope_theta) if rope_theta is not None else 10000.0,
            torch_dtype=dtype,
            vision_config=VisionConfig.from_dict(vc, source, "vision_config") if vc is not None else None,
            extra=d,
        )
        cfg.validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> ParrotConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ParrotError(f"{path}: not found. A Parrot model directory needs a config.json.")
        d = parse_json(path.read_bytes(), str(path))
        if not isinstance(d, dict):
            raise ParrotError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=str(path))

    def validate(self, source: str = "config.json") -> None:
        """The relations between fields (the fields' own types and ranges are checked when reading)."""
        values = {**self.extra, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}}
        check_relations(values, PARROT_RELATIONS, source)
        projector_depth(self.mm_projector_type, source)
        rs = self.rope_scaling or {}
        kind = rs.get("type") or rs.get("rope_type") or "default"
        if kind != "default" and "factor" not in rs:
            raise ParrotError(f"{source}: rope_scaling.factor is missing; expected a positive number (rope_scaling "
                              f"type {kind!r} needs it)")
        if self.moe_active and self.mm_vision_select_feature != "cls_patch":
            raise ParrotError(f"{source}: the MoE needs mm_vision_select_feature 'cls_patch'")

    # ---------------------------------------------------------------- writing
    def to_dict(self, layout: str = "official") -> dict[str, Any]:
        """The config.json dict. `layout='mlx'` adds the resolved vision config and quantization."""
        d: dict[str, Any] = dict(self.extra)
        d["model_type"] = MODEL_TYPE
        d.setdefault("architectures", [ARCHITECTURE])
        for f in fields(self):
            if f.name in ("extra", "vision_config", "quantization"):
                continue
            v = getattr(self, f.name)
            if f.name in ("moe_hidden_size",) and v is None:
                continue
            d[f.name] = copy.deepcopy(v)
        if isinstance(d.get("rope_parameters"), dict):
            d["rope_parameters"]["rope_theta"] = self.rope_theta
        if "dtype" in self.extra:
            d["dtype"] = self.torch_dtype
        if layout == "mlx":
            if self.vision_config is not None:
                d["vision_config"] = self.vision_config.to_dict()
            if self.quantization:
                d["quantization"] = copy.deepcopy(self.quantization)
        elif layout != "official":
            raise ValueError(f"unknown layout {layout!r}")
        return dict(sorted(d.items()))

    def save(self, directory: str | Path, layout: str = "official") -> None:
        Path(directory, "config.json").write_text(
            json.dumps(self.to_dict(layout), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    # ---------------------------------------------------------------- derived
    @property
    def has_moe(self) -> bool:
        """The checkpoint holds MoE weights (official: `moe_hidden_size` in the config)."""
        return self.moe_hidden_size is not None

    @property
    def moe_active(self) -> bool:
        return self.has_moe and self.use_moe

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def projector_depth(self) -> int:
        return projector_depth(self.mm_projector_type)

    def vision_layers_used(self, vision: VisionConfig) -> int:
        """How many CLIP encoder layers the selected hidden state needs (-2: all but the last)."""
        n = vision.num_hidden_layers
        sel = self.mm_vision_select_layer
        used = n + 1 + sel if sel < 0 else sel
        if not 0 <= used <= n:
            raise ParrotError(
                f"config.json: mm_vision_select_layer is {sel}; expected an integer from {-n - 1} to {n} "
                f"(the vision tower has {n} layers)"
            )
        return used

    def num_visual_tokens(self, vision: VisionConfig) -> int:
        n = vision.num_patches
        return n + 1 if self.mm_vision_select_feature == "cls_patch" else n

    def llm_dict(self) -> dict[str, Any]:
        """Qwen2 fields, with `rope_theta` explicit (for transformers' Qwen2Config and mlx-lm)."""
        return {
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
