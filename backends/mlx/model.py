"""The Parrot model in MLX: CLIP vision tower, projector and MoE here; the LLM is mlx-lm's Qwen2.

Same classes, in the same order, as backends/torch_cuda/model.py. Module names are the MLX-layout
keys (parrot.model.layout): language_model.*, vision_tower.vision_model.*, mm_projector.N, moe_model.*.
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from parrot.model.config import ParrotConfig, VisionConfig
from parrot.model.splice import SplicePlan

from .mlxlm import qwen2


@partial(mx.compile, shapeless=True)
def quick_gelu(x: mx.array) -> mx.array:
    """CLIP's x * sigmoid(1.702 x), compiled into one fused kernel (the same operations, so the same values)."""
    return x * mx.sigmoid(1.702 * x)


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, one fused kernel."""
    return nn.silu(gate) * up


_ACT = {
    "quick_gelu": quick_gelu,
    "gelu": nn.gelu,
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
}


class CLIPAttention(nn.Module):
    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dims // heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape
        q, k, v = (
            p(x).reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size)
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size)
        self.act = _ACT[v.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(v.hidden_size, v.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.mlp = CLIPMLP(v)
        self.layer_norm2 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, v: VisionConfig, layers: int):
        super().__init__()
        self.layers = [CLIPEncoderLayer(v) for _ in range(layers)]


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.class_embedding = mx.zeros((v.hidden_size,))
        self.patch_embedding = nn.Conv2d(
            v.num_channels, v.hidden_size, kernel_size=v.patch_size, stride=v.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(v.num_positions, v.hidden_size)

    def __call__(self, pixels_nhwc: mx.array) -> mx.array:
        B = pixels_nhwc.shape[0]
        patches = self.patch_embedding(pixels_nhwc)  # [B, gh, gw, D]
        patches = patches.reshape(B, -1, patches.shape[-1])
        cls = mx.broadcast_to(self.class_embedding.astype(patches.dtype), (B, 1, patches.shape[-1]))
        h = mx.concatenate([cls, patches], axis=1)
        return h + self.position_embedding.weight[None]


class CLIPVisionBody(nn.Module):
    """Up to the encoder output of the selected layer; no post_layernorm (Parrot never uses it)."""

    def __init__(self, v: VisionConfig, layers: int):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(v)
        self.pre_layrnorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.encoder = CLIPEncoder(v, layers)

    def __call__(self, pixels_nhwc: mx.array) -> mx.array:
        h = self.pre_layrnorm(self.embeddings(pixels_nhwc))
        for layer in self.encoder.layers:
            h = layer(h)
        return h


class VisionTower(nn.Module):
    def __init__(self, cfg: ParrotConfig, v: VisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionBody(v, cfg.vision_layers_used(v))
        self.drop_cls = cfg.mm_vision_select_feature == "patch"

    def __call__(self, pixels_nchw: mx.array) -> mx.array:
        dtype = self.vision_model.pre_layrnorm.weight.dtype
        h = self.vision_model(pixels_nchw.transpose(0, 2, 3, 1).astype(dtype))
        return h[:, 1:] if self.drop_cls else h


def build_projector(cfg: ParrotConfig) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Linear(cfg.mm_hidden_size, cfg.hidden_size)]
    for _ in range(1, cfg.projector_depth):
        layers += [nn.GELU(), nn.Linear(cfg.hidden_size, cfg.hidden_size)]
    return layers


class Expert(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class MultilingualMoE(nn.Module):
    """Text-guided MoE, batched over images: G_v = sum_i p_i E_i(H_v) + moe_weight * H_v."""

    def __init__(self, cfg: ParrotConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = [Expert(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts)]
        self.use_moe = cfg.use_moe
        self.use_moe_residual = cfg.use_moe_residual
        self.moe_weight = cfg.moe_weight

    def routing(self, text: mx.array, text_mask: mx.array | None, cls: mx.array) -> mx.array:
        """p [B, E] from text [B, T, C] (mask [B, T]) and the CLS visual token [B, C]."""
        scores = (cls[:, None] @ text.transpose(0, 2, 1)) / math.sqrt(cls.shape[-1])  # [B, 1, T]
        if text_mask is not None:
            scores = mx.where(text_mask[:, None, :], scores, -mx.inf)
        attn = mx.softmax(scores, axis=-1, precise=True)
        if text_mask is not None:
            attn = mx.where(text_mask.any(axis=-1)[:, None, None], attn, 0.0)
        a = attn @ text  # [B, 1, C]
        return mx.softmax(self.gate(a), axis=-1, precise=True)[:, 0]

    def expert_outputs(self, image_features: mx.array) -> mx.array:
        """E_i(H_v) stacked [E, B, N, C]: independent of the text, so cacheable per image."""
        return mx.stack([e(image_features) for e in self.experts], axis=0)

    def __call__(
        self, text: mx.array, text_mask: mx.array | None, image_features: mx.array, experts: mx.array | None = None
    ) -> mx.array:
        if not self.use_moe:
            return image_features
        p = self.routing(text, text_mask, image_features[:, 0])  # [B, E]
        experts = self.expert_outputs(image_features) if experts is None else experts  # [E, B, N, C]
        out = mx.sum(p.T[:, :, None, None].astype(experts.dtype) * experts, axis=0)
        if self.use_moe_residual:
            out = out + self.moe_weight * image_features
        return out


def packed_block(layer: nn.Module, x: mx.array, bounds: list[int]) -> mx.array:
    """One mlx-lm Qwen2 decoder layer (`TransformerBlock`: the same submodules, in the same order) over a packed
    row: each sample's RoPE positions from 0 and causal attention within the sample, one fused SDPA call per
    sample (mx.fast.rope takes one offset per row, not per position)."""
    a = layer.self_attn
    h = layer.input_layernorm(x)
    B, L, _ = h.shape
    q = a.q_proj(h).reshape(B, L, a.n_heads, -1).transpose(0, 2, 1, 3)
    k = a.k_proj(h).reshape(B, L, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = a.v_proj(h).reshape(B, L, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
    o = mx.concatenate([
        mx.fast.scaled_dot_product_attention(a.rope(q[:, :, s:e]), a.rope(k[:, :, s:e]), v[:, :, s:e], scale=a.scale,
                                             mask="causal")
        for s, e in zip(bounds[:-1], bounds[1:]) if e > s], axis=2)
    h = x + a.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


class ParrotForCausalLM(nn.Module):
    def __init__(self, cfg: ParrotConfig, vision: VisionConfig):
        super().__init__()
        self.config = cfg
        self.language_model = qwen2.Model(qwen2.ModelArgs.from_dict(cfg.llm_dict()))
        self.vision_tower = VisionTower(cfg, vision)
        self.mm_projector = build_projector(cfg)
        if cfg.has_moe:
            self.moe_model = MultilingualMoE(cfg)

    # ------------------------------------------------------------ vision side
    def encode_images(self, pixels_nchw: mx.array) -> mx.array:
        """CLIP + projector: [B, 3, H, W] -> H_v [B, N, C] (before the MoE)."""
        h = self.vision_tower(pixels_nchw)
        for layer in self.mm_projector:
            h = layer(h)
        return h

    def apply_moe(
        self, text: mx.array, text_mask: mx.array | None, image_features: mx.array, experts: mx.array | None = None
    ) -> mx.array:
        if "moe_model" not in self:
            return image_features
        return self.moe_model(text, text_mask, image_features, experts)

    def expert_outputs(self, image_features: mx.array) -> mx.array | None:
        """The MoE experts' outputs for H_v (None without an active MoE): cacheable per image."""
        if "moe_model" not in self or not self.moe_model.use_moe:
            return None
        return self.moe_model.expert_outputs(image_features)

    # ------------------------------------------------------------ splice
    def embed_tokens(self, ids: mx.array) -> mx.array:
        return self.language_model.model.embed_tokens(ids)

    def splice(self, plan: SplicePlan, image_features: mx.array | None = None, experts: mx.array | None = None
               ) -> mx.array:
        """[B, T', C] input embeddings of a planned batch (parrot.model.splice): the word embeddings of
        `plan.text_ids`, and MoE(H_v) for the rows `plan.image_rows` (image_features [K, N, C]; experts:
        their cached `expert_outputs`), the MoE attending over each row's `plan.context`."""
        tok = self.embed_tokens(mx.array(plan.text_ids))
        visual = None
        if len(plan.image_rows):
            rows = mx.array(plan.image_rows)
            visual = self.apply_moe(tok[rows], mx.array(plan.context[plan.image_rows]), image_features, experts)
        return self.place(plan, tok, visual)

    @staticmethod
    def place(plan: SplicePlan, tok: mx.array, visual: mx.array | None) -> mx.array:
        """The plan's one gather over [word embeddings | visual tokens | a zero row]."""
        B, T, C = tok.shape
        parts = [tok.reshape(B * T, C)]
        if visual is not None:
            parts.append(visual.reshape(-1, C).astype(tok.dtype))
        parts.append(mx.zeros((1, C), tok.dtype))
        return mx.concatenate(parts)[mx.array(plan.gather)]

    # ------------------------------------------------------------ the LLM
    def hidden_states(self, inputs_embeds: mx.array, cache=None) -> mx.array:
        """Final-norm hidden states [B, T, C]: causal attention (right padding needs no other mask; a
        left-padded batch passes mlx-lm's BatchKVCache, which masks the padding and offsets positions)."""
        return self.language_model.model(None, cache=cache, input_embeddings=inputs_embeds)

    def packed_hidden_states(self, inputs_embeds: mx.array, cu_seqlens) -> mx.array:
        """Final-norm hidden states [1, L, C] of one packed row (parrot.model.splice.pack_plan): attention within
        each sample, its positions from 0 (`packed_block`). A layer under gradient checkpointing (its class has
        `grad_checkpoint`) is recomputed in the backward pass, as in the unpacked forward."""
        lm = self.language_model.model
        bounds = [int(x) for x in cu_seqlens]
        h = inputs_embeds
        for layer in lm.layers:
            if getattr(layer, "grad_checkpoint", False):
                def inner(params, x, layer=layer):
                    layer.update(params)
                    return packed_block(layer, x, bounds)

                h = mx.checkpoint(inner)(layer.trainable_parameters(), h)
            else:
                h = packed_block(layer, h, bounds)
        return lm.norm(h)

    def lm_logits(self, h: mx.array) -> mx.array:
        lm = self.language_model
        return lm.model.embed_tokens.as_linear(h) if lm.args.tie_word_embeddings else lm.lm_head(h)

    def __call__(self, inputs_embeds: mx.array, cache=None) -> mx.array:
        """Logits [B, T, V] from input embeddings (mlx-lm's Qwen2 with its KV cache)."""
        return self.language_model(None, cache=cache, input_embeddings=inputs_embeds)

    @property
    def layers(self):
        return self.language_model.layers
