"""The parameter manifest: every official-layout key and shape a config implies.

`validate` checks a checkpoint's keys and shapes before anything is loaded and names the first
missing, unexpected or mis-shaped key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import ParrotError
from .config import ParrotConfig, VisionConfig
from .layout import OFFICIAL_VISION

Shape = tuple[int, ...]


@dataclass
class Manifest:
    required: dict[str, Shape] = field(default_factory=dict)
    # held by released checkpoints but never used (CLIP's last layer, post_layernorm, buffers)
    optional: dict[str, Shape | None] = field(default_factory=dict)

    def vision_keys(self) -> list[str]:
        return [k for k in self.required if k.startswith(OFFICIAL_VISION)]


_IGNORED = [
    re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
    re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids$"),
]


def _clip_layer(prefix: str, v: VisionConfig) -> dict[str, Shape]:
    D, I = v.hidden_size, v.intermediate_size
    out: dict[str, Shape] = {}
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        out[f"{prefix}self_attn.{p}.weight"] = (D, D)
        out[f"{prefix}self_attn.{p}.bias"] = (D,)
    for n in ("layer_norm1", "layer_norm2"):
        out[f"{prefix}{n}.weight"] = (D,)
        out[f"{prefix}{n}.bias"] = (D,)
    out[f"{prefix}mlp.fc1.weight"] = (I, D)
    out[f"{prefix}mlp.fc1.bias"] = (I,)
    out[f"{prefix}mlp.fc2.weight"] = (D, I)
    out[f"{prefix}mlp.fc2.bias"] = (D,)
    return out


def vision_manifest(cfg: ParrotConfig, v: VisionConfig, prefix: str = OFFICIAL_VISION) -> Manifest:
    m = Manifest()
    D = v.hidden_size
    p = prefix + "vision_model."
    m.required[p + "embeddings.class_embedding"] = (D,)
    m.required[p + "embeddings.patch_embedding.weight"] = (D, v.num_channels, v.patch_size, v.patch_size)
    m.required[p + "embeddings.position_embedding.weight"] = (v.num_positions, D)
    m.required[p + "pre_layrnorm.weight"] = (D,)
    m.required[p + "pre_layrnorm.bias"] = (D,)
    used = cfg.vision_layers_used(v)
    for i in range(v.num_hidden_layers):
        target = m.required if i < used else m.optional
        target.update(_clip_layer(f"{p}encoder.layers.{i}.", v))
    m.optional[p + "post_layernorm.weight"] = (D,)
    m.optional[p + "post_layernorm.bias"] = (D,)
    return m


def build_manifest(cfg: ParrotConfig, v: VisionConfig, with_vision: bool = True) -> Manifest:
    C, V = cfg.hidden_size, cfg.vocab_size
    hd = cfg.head_dim
    m = Manifest()
    r = m.required
    r["model.embed_tokens.weight"] = (V, C)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        r[p + "self_attn.q_proj.weight"] = (cfg.num_attention_heads * hd, C)
        r[p + "self_attn.q_proj.bias"] = (cfg.num_attention_heads * hd,)
        for n in ("k_proj", "v_proj"):
            r[p + f"self_attn.{n}.weight"] = (cfg.num_key_value_heads * hd, C)
            r[p + f"self_attn.{n}.bias"] = (cfg.num_key_value_heads * hd,)
        r[p + "self_attn.o_proj.weight"] = (C, cfg.num_attention_heads * hd)
        r[p + "mlp.gate_proj.weight"] = (cfg.intermediate_size, C)
        r[p + "mlp.up_proj.weight"] = (cfg.intermediate_size, C)
        r[p + "mlp.down_proj.weight"] = (C, cfg.intermediate_size)
        r[p + "input_layernorm.weight"] = (C,)
        r[p + "post_attention_layernorm.weight"] = (C,)
    r["model.norm.weight"] = (C,)
    if cfg.tie_word_embeddings:
        m.optional["lm_head.weight"] = (V, C)
    else:
        r["lm_head.weight"] = (V, C)
    # projector: Linear(mm_hidden, C) then (GELU, Linear(C, C)) x (depth - 1)
    for j in range(cfg.projector_depth):
        r[f"model.mm_projector.{2 * j}.weight"] = (C, cfg.mm_hidden_size if j == 0 else C)
        r[f"model.mm_projector.{2 * j}.bias"] = (C,)
    if cfg.has_moe:
        r["model.moe_model.gate.weight"] = (cfg.num_experts, C)
        for e in range(cfg.num_experts):
            p = f"model.moe_model.experts.{e}."
            r[p + "gate_proj.weight"] = (cfg.moe_intermediate_size, C)
            r[p + "up_proj.weight"] = (cfg.moe_intermediate_size, C)
            r[p + "down_proj.weight"] = (C, cfg.moe_intermediate_size)
    if v.hidden_size != cfg.mm_hidden_size:
        raise ParrotError(
            f"config: mm_hidden_size {cfg.mm_hidden_size} does not match the vision tower's hidden_size "
            f"{v.hidden_size}"
        )
    vm = vision_manifest(cfg, v)
    if with_vision:
        r.update(vm.required)
    m.optional.update(vm.optional)
    return m


def _summarize(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def validate(shapes: dict[str, Shape], manifest: Manifest, source: str) -> None:
    """Raises ParrotError naming the first problem: missing, unexpected or mis-shaped keys."""
    missing = [k for k in manifest.required if k not in shapes]
    if missing:
        raise ParrotError(f"{source}: missing tensor(s) {_summarize(missing)}. The checkpoint is incomplete "
                          "or does not match its config.json.")
    unexpected = [
        k for k in shapes
        if k not in manifest.required and k not in manifest.optional and not any(p.match(k) for p in _IGNORED)
    ]
    if unexpected:
        raise ParrotError(f"{source}: unexpected tensor(s) {_summarize(unexpected)} not described by config.json")
    for k, want in list(manifest.required.items()) + list(manifest.optional.items()):
        if k in shapes and want is not None and tuple(shapes[k]) != tuple(want):
            raise ParrotError(
                f"{source}: tensor {k!r} has shape {tuple(shapes[k])}, config.json implies {tuple(want)}"
            )


def is_used(key: str, manifest: Manifest) -> bool:
    return key in manifest.required
