"""Tiny random Parrot checkpoints in the official layout, so tests and benchmarks never need the hub.

`write_tiny_checkpoint(dir)` writes config.json, safetensors weights (including CLIP's unused last
layer and post_layernorm, as the released checkpoints do), a CLIP tower directory and a small
byte-level BPE tokenizer with the ChatML special tokens. Weights are scaled so logits are O(1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, trainers
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.pre_tokenizers import ByteLevel

from .model.config import ParrotConfig, VisionConfig
from .model.image import ImageSettings
from .model.manifest import build_manifest
from .model.tokenizer import CHATML_TEMPLATE, qwen2_backend
from .storage.safetensors_io import NAME_TO_NP, save_tensors

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "You are a helpful assistant. Describe the image in detail.",
    "What is in the picture? There is a red apple on a wooden table next to a cup of tea.",
    "The quick brown fox jumps over the lazy dog. Answer with the option's letter from the given choices.",
    "这张图片里有什么？图片里有一只猫坐在窗台上。请用中文回答。",
    "ما الذي في الصورة؟ هناك قطة تجلس على حافة النافذة.",
    "Что изображено на картинке? На картинке кошка сидит на подоконнике.",
    "Resimde ne var? Pencere kenarında oturan bir kedi var. Çok güzel, değil mi?",
    "O que há na imagem? Há um gato sentado no parapeito da janela.",
    "1 2 3 4 5 6 7 8 9 10 100 2024 A. B. C. D. yes no",
]


@dataclass
class TinySpec:
    hidden_size: int = 64
    intermediate_size: int = 96
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rope_theta: float = 12345.0
    moe_intermediate_size: int = 80
    num_experts: int = 6
    moe_weight: float = 0.25
    use_moe: bool = True
    tie_word_embeddings: bool = False
    extra_vocab: int = 13  # model vocab is larger than the tokenizer's, as in Qwen
    vocab_size: int = 384  # BPE target size
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(
        hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
        image_size=30, patch_size=6, projection_dim=32,
    ))


def train_tokenizer(vocab_size: int = 384) -> _HFTokenizer:
    tok = qwen2_backend({}, [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def write_tokenizer(directory: Path, vocab_size: int = 384) -> int:
    tok = train_tokenizer(vocab_size)
    data = json.loads(tok.to_str())
    # merges as "a b" strings (the format Qwen ships), which older tokenizers releases also read
    data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    added = {
        str(tok.token_to_id(t)): {"content": t, "special": True, "normalized": False, "lstrip": False,
                                  "rstrip": False, "single_word": False}
        for t in SPECIAL_TOKENS
    }
    cfg = {
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "bos_token": None, "model_max_length": 32768, "errors": "replace",
        "add_prefix_space": False, "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "chat_template": CHATML_TEMPLATE, "added_tokens_decoder": added,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    vocab = tok.get_vocab()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + data["model"]["merges"]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tok.get_vocab_size(with_added_tokens=True)


def tiny_config(spec: TinySpec, vocab_size: int, tower_ref: str, dtype: str = "float32") -> ParrotConfig:
    return ParrotConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_theta=spec.rope_theta, tie_word_embeddings=spec.tie_word_embeddings, torch_dtype=dtype,
        mm_vision_tower=tower_ref, mm_hidden_size=spec.vision.hidden_size,
        num_experts=spec.num_experts, moe_hidden_size=spec.hidden_size,
        moe_intermediate_size=spec.moe_intermediate_size, moe_weight=spec.moe_weight, use_moe=spec.use_moe,
        extra={"architectures": ["ParrotQwen2ForCausalLM"], "hidden_act": "silu", "use_cache": True,
               "bos_token_id": None, "eos_token_id": None, "initializer_range": 0.02,
               "use_sliding_window": False, "tokenizer_model_max_length": 2048,
               "tokenizer_padding_side": "right", "use_mm_proj": True},
    )


def random_weights(cfg: ParrotConfig, vision: VisionConfig, seed: int) -> dict[str, np.ndarray]:
    """Every manifest tensor (used and unused CLIP layers), scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    m = build_manifest(cfg, vision)
    shapes = {**m.required, **{k: s for k, s in m.optional.items() if s is not None}}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    out = {}
    for k, shape in shapes.items():
        if k.endswith(("norm.weight", "layernorm.weight", "layrnorm.weight", "layer_norm1.weight",
                       "layer_norm2.weight")):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif k.endswith("bias"):
            a = 0.1 * rng.standard_normal(shape)
        elif "embed_tokens" in k or "class_embedding" in k or "position_embedding" in k:
            a = rng.standard_normal(shape)
        elif k == "lm_head.weight":
            a = 2.0 * rng.standard_normal(shape) / np.sqrt(shape[1])
        elif "patch_embedding" in k:
            a = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        elif "moe_model.gate" in k:
            a = 3.0 * rng.standard_normal(shape) / np.sqrt(shape[1])
        else:
            a = rng.standard_normal(shape) / np.sqrt(shape[-1])
        out[k] = a.astype(np.float32)
    return out


def write_tiny_checkpoint(
    directory: str | Path,
    spec: TinySpec | None = None,
    seed: int = 0,
    dtype: str = "float32",
    vision_in_checkpoint: bool = True,
    tower_weights: bool = True,
    tower_ref: str = "relative",
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Writes a complete official-layout checkpoint; returns its directory.

    tower_ref: "relative" (mm_vision_tower is a path relative to the checkpoint), "absolute", or
    "builtin" (the hub id openai/clip-vit-large-patch14-336, for resolution tests).
    """
    spec = spec or TinySpec()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tower_dir = d / "clip-vit-tiny"
    tower_dir.mkdir(exist_ok=True)
    ref = {"relative": "clip-vit-tiny", "absolute": str(tower_dir.resolve()),
           "builtin": "openai/clip-vit-large-patch14-336"}[tower_ref]
    n_tok = write_tokenizer(d, spec.vocab_size)
    cfg = tiny_config(spec, n_tok + spec.extra_vocab, ref, dtype)
    cfg.save(d)
    v = spec.vision
    clip_cfg = {"architectures": ["CLIPVisionModel"], **v.to_dict(), "torch_dtype": dtype}
    (tower_dir / "config.json").write_text(json.dumps(clip_cfg, indent=2))
    ImageSettings.clip_defaults(v.image_size).save(tower_dir)
    weights = random_weights(cfg, v, seed)
    np_dtype = NAME_TO_NP[dtype]
    weights = {k: w.astype(np_dtype) for k, w in weights.items()}
    vision = {k: w for k, w in weights.items() if k.startswith("model.vision_tower.")}
    if tower_weights:
        tw = {k[len("model.vision_tower.vision_tower."):]: w for k, w in vision.items()}
        save_tensors(tw, tower_dir)
    if not vision_in_checkpoint:
        weights = {k: w for k, w in weights.items() if k not in vision}
    save_tensors(weights, d, max_shard_bytes=max_shard_bytes)
    return d


def spec_variants() -> list[TinySpec]:
    """Sizes the parity tests sweep: GQA, MHA, tied embeddings, odd image sizes, moe_weight != 0.1."""
    base = TinySpec()
    return [
        base,
        replace(base, hidden_size=48, num_attention_heads=6, num_key_value_heads=6, rope_theta=1e6,
                moe_weight=0.1, intermediate_size=112, num_hidden_layers=3,
                vision=VisionConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                    num_attention_heads=2, image_size=21, patch_size=7, projection_dim=16)),
        replace(base, hidden_size=80, num_attention_heads=4, num_key_value_heads=1, rope_theta=5e5,
                moe_weight=0.7, num_experts=3, tie_word_embeddings=True,
                vision=VisionConfig(hidden_size=40, intermediate_size=64, num_hidden_layers=4,
                                    num_attention_heads=5, image_size=33, patch_size=11, hidden_act="gelu",
                                    projection_dim=16)),
    ]


def write_tiny_clip(directory: str | Path, vision: VisionConfig | None = None, seed: int = 0,
                    dtype: str = "float32") -> Path:
    """A CLIP vision tower directory (config.json, preprocessor_config.json, `vision_model.*` weights)."""
    v = vision or TinySpec().vision
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["CLIPVisionModel"], **v.to_dict(),
                                               "torch_dtype": dtype}, indent=2))
    ImageSettings.clip_defaults(v.image_size).save(d)
    cfg = tiny_config(TinySpec(vision=v), 400, str(d), dtype)
    prefix = "model.vision_tower.vision_tower."
    w = {k[len(prefix):]: a.astype(NAME_TO_NP[dtype]) for k, a in random_weights(cfg, v, seed).items()
         if k.startswith(prefix)}
    save_tensors(w, d)
    return d


def write_tiny_llm(directory: str | Path, spec: TinySpec | None = None, seed: int = 0, dtype: str = "float32") -> Path:
    """A plain Qwen2 LLM directory (transformers layout: config.json model_type qwen2, weights, tokenizer),
    for `parrot train --llm`."""
    spec = spec or TinySpec()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    n_tok = write_tokenizer(d, spec.vocab_size)
    cfg = tiny_config(spec, n_tok + spec.extra_vocab, "unused", dtype)
    qwen = {"architectures": ["Qwen2ForCausalLM"], **cfg.llm_dict(), "hidden_act": "silu", "torch_dtype": dtype,
            "bos_token_id": None, "eos_token_id": None, "use_cache": True, "use_sliding_window": False,
            "attention_dropout": 0.0, "initializer_range": 0.02}
    qwen.pop("rope_scaling")
    (d / "config.json").write_text(json.dumps(qwen, indent=2))
    w = {k: a.astype(NAME_TO_NP[dtype]) for k, a in random_weights(cfg, spec.vision, seed).items()
         if not k.startswith(("model.vision_tower.", "model.mm_projector.", "model.moe_model."))}
    save_tensors(w, d)
    return d
