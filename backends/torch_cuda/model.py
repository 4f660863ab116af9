"""The Parrot model in PyTorch, on transformers' Qwen2 and CLIP vision modules.

Module names follow the official checkpoint keys, so official safetensors load without renaming:
model.{embed_tokens,layers,norm}, model.vision_tower.vision_tower.vision_model.*,
model.mm_projector.{0,2}, model.moe_model.{gate,experts.N}, lm_head. No distributed code here:
sharding is applied from outside.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, CLIPVisionConfig, Qwen2Config, Qwen2Model
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPVisionEmbeddings

from parrot.constants import IGNORE_INDEX
from parrot.model.config import ParrotConfig, VisionConfig
from parrot.model.splice import SplicePlan, pack_plan, plan_splice

# transformers renamed `past_key_values` to `cache` in 5.2x; pass whichever this version takes
_CACHE_KW = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"


SEGMENT_ATTENTION = "parrot_segments"


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention for packed rows: causal SDPA within each sample (`cu_seq_lens_q`, host offsets), so
    the work is the sum of the samples' squares, not the packed row's square. Without them: plain SDPA."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = cu.tolist()
    gqa = query.shape[1] != key.shape[1]
    out = torch.cat([F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                                    dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
                     for s, e in zip(bounds[:-1], bounds[1:]) if e > s], dim=2)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)


def _rope_type(rope_scaling: dict | None) -> str:
    """The scaling's type under either key: transformers writes `rope_type`, older configs `type` (mlx-lm
    reads `type` first)."""
    r = rope_scaling or {}
    return r.get("rope_type") or r.get("type") or "default"


def qwen2_config(cfg: ParrotConfig) -> Qwen2Config:
    d = cfg.llm_dict()
    d.pop("model_type")
    rope_scaling = d.pop("rope_scaling")
    qc = Qwen2Config(**d, use_sliding_window=False)
    qc.rope_parameters = {**(rope_scaling or {}), "rope_type": _rope_type(rope_scaling),
                          "rope_theta": cfg.rope_theta}
    qc._attn_implementation = "sdpa"
    return qc


class CLIPVisionBody(nn.Module):
    """CLIP's vision transformer up to the encoder output (no post_layernorm: Parrot never uses it)."""

    def __init__(self, clip: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(clip)
        self.pre_layrnorm = nn.LayerNorm(clip.hidden_size, eps=clip.layer_norm_eps)
        self.encoder = CLIPEncoder(clip)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.pre_layrnorm(self.embeddings(pixel_values))
        return self.encoder(inputs_embeds=h).last_hidden_state


class CLIPVision(nn.Module):
    def __init__(self, clip: CLIPVisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionBody(clip)


class VisionTower(nn.Module):
    """CLIP truncated to the layers the selected hidden state needs (-2: all but the last)."""

    def __init__(self, cfg: ParrotConfig, v: VisionConfig):
        super().__init__()
        clip = CLIPVisionConfig(**{**v.to_dict(), "num_hidden_layers": cfg.vision_layers_used(v)})
        clip._attn_implementation = "sdpa"
        self.vision_tower = CLIPVision(clip)
        self.drop_cls = cfg.mm_vision_select_feature == "patch"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        p = self.vision_tower.vision_model.embeddings.patch_embedding.weight
        h = self.vision_tower.vision_model(pixel_values.to(device=p.device, dtype=p.dtype))
        return h[:, 1:] if self.drop_cls else h


def build_projector(cfg: ParrotConfig) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(cfg.mm_hidden_size, cfg.hidden_size)]
    for _ in range(1, cfg.projector_depth):
        layers += [nn.GELU(), nn.Linear(cfg.hidden_size, cfg.hidden_size)]
    return nn.Sequential(*layers)


class Expert(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MultilingualMoE(nn.Module):
    """Text-guided MoE, batched over images: G_v = sum_i p_i E_i(H_v) + moe_weight * H_v."""

    def __init__(self, cfg: ParrotConfig):
        super().__init__()
        C = cfg.hidden_size
        self.gate = nn.Linear(C, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(C, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        self.use_moe = cfg.use_moe
        self.use_moe_residual = cfg.use_moe_residual
        self.moe_weight = cfg.moe_weight

    def routing(self, text: torch.Tensor, text_mask: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """p [B, E] from text [B, T, C] (mask [B, T]) and the CLS visual token [B, C]."""
        scale = torch.sqrt(torch.tensor(cls.shape[-1], dtype=torch.float32))
        scores = torch.matmul(cls[:, None], text.transpose(1, 2)) / scale  # [B, 1, T]
        scores = scores.masked_fill(~text_mask[:, None, :], float("-inf"))
        attn = torch.nan_to_num(F.softmax(scores, dim=-1), nan=0.0)  # a row with no text attends to nothing
        a = torch.matmul(attn, text)  # [B, 1, C]
        return F.softmax(self.gate(a), dim=-1, dtype=cls.dtype)[:, 0]

    def expert_outputs(self, image_features: torch.Tensor) -> torch.Tensor:
        """E_i(H_v) stacked [E, B, N, C]: independent of the text, so cacheable per image."""
        return torch.stack([e(image_features) for e in self.experts], dim=0)

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, image_features: torch.Tensor,
        experts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.use_moe:
            return image_features
        p = self.routing(text, text_mask, image_features[:, 0])  # [B, E]
        experts = self.expert_outputs(image_features) if experts is None else experts  # [E, B, N, C]
        out = torch.sum(p.t()[:, :, None, None] * experts, dim=0)
        if self.use_moe_residual:
            out = out + self.moe_weight * image_features
        return out


class ParrotQwen2Model(Qwen2Model):
    def __init__(self, cfg: ParrotConfig, vision: VisionConfig):
        super().__init__(qwen2_config(cfg))
        # built after Qwen2Model's post_init, so they keep torch's default init (as the official code)
        self.vision_tower = VisionTower(cfg, vision)
        self.mm_projector = build_projector(cfg)
        self.moe_model = MultilingualMoE(cfg) if cfg.has_moe else None


class ParrotForCausalLM(nn.Module):
    def __init__(self, cfg: ParrotConfig, vision: VisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_config = vision
        self.model = ParrotQwen2Model(cfg, vision)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------ vision side
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP + projector: [B, 3, H, W] -> H_v [B, N, C] (before the MoE)."""
        feats = self.model.vision_tower(pixel_values)
        proj = self.model.mm_projector
        return proj(feats.to(proj[0].weight.dtype))

    def apply_moe(
        self, text: torch.Tensor, text_mask: torch.Tensor, image_features: torch.Tensor,
        experts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.model.moe_model is None:
            return image_features
        return self.model.moe_model(text, text_mask, image_features, experts)

    def expert_outputs(self, image_features: torch.Tensor) -> torch.Tensor | None:
        """The MoE experts' outputs for H_v (None without an active MoE): cacheable per image."""
        moe = self.model.moe_model
        return None if moe is None or not moe.use_moe else moe.expert_outputs(image_features)

    # ------------------------------------------------------------ splice
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def splice(
        self, plan: SplicePlan, image_features: torch.Tensor | None = None, experts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, T', C] input embeddings of a planned batch (parrot.model.splice): the word embeddings of
        `plan.text_ids`, and MoE(H_v) for the rows `plan.image_rows` (image_features [K, N, C]; experts:
        their cached `expert_outputs`), the MoE attending over each row's `plan.context`."""
        dev = self.model.embed_tokens.weight.device
        tok = self.embed_tokens(torch.from_numpy(plan.text_ids).to(dev))
        visual = None
        if len(plan.image_rows):
            rows = torch.from_numpy(plan.image_rows).to(dev)
            ctx = torch.from_numpy(plan.context[plan.image_rows]).to(dev)
            visual = self.apply_moe(tok[rows], ctx, image_features, experts)
        return self.place(plan, tok, visual)

    @staticmethod
    def place(plan: SplicePlan, tok: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        """The plan's one gather over [word embeddings | visual tokens | a zero row]."""
        B, T, C = tok.shape
        parts = [tok.reshape(B * T, C)]
        if visual is not None:
            parts.append(visual.reshape(-1, C).to(tok.dtype))
        parts.append(tok.new_zeros(1, C))
        return torch.cat(parts)[torch.from_numpy(plan.gather).to(tok.device)]

    # ------------------------------------------------------------ the LLM
    def hidden_states(self, inputs_embeds, attention_mask, position_ids, cache=None) -> torch.Tensor:
        """The Qwen2 stack: final-norm hidden states. `cache` (a transformers Cache) is updated in place."""
        out = self.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(), position_ids=position_ids,
            use_cache=cache is not None, **{_CACHE_KW: cache},
        )
        return out.last_hidden_state

    def packed_hidden_states(self, inputs_embeds, position_ids, cu_seqlens) -> torch.Tensor:
        """The Qwen2 stack over one packed row (parrot.model.splice.pack_plan), attention within each sample:
        flash-attention's varlen kernels when the model uses flash_attention_2 (CUDA), else causal SDPA per
        sample (`segment_attention`, which the model switches to here; unpacked calls fall back to SDPA)."""
        config = self.model.config
        cu = torch.from_numpy(np.asarray(cu_seqlens, dtype=np.int32))
        if config._attn_implementation == "flash_attention_2":
            longest = int(np.diff(cu_seqlens).max())
            cu = cu.to(inputs_embeds.device)
            kw = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
        else:
            config._attn_implementation = SEGMENT_ATTENTION
            kw = {"cu_seq_lens_q": cu}
        # a ready mask mapping: transformers builds no [L, L] mask; the attention reads the samples' offsets
        return self.model(inputs_embeds=inputs_embeds, attention_mask={"full_attention": None},
                          position_ids=position_ids, use_cache=False, **kw).last_hidden_state

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        max_length: int | None = None,
        padding_side: str = "right",
        packing: bool = False,
    ) -> tuple[torch.Tensor, SplicePlan]:
        """Full forward (no cache) of a right-padded batch (input_ids, attention_mask and labels [B, T],
        planned on the host: pass them on the CPU), pixel_values [B, 3, H, W] for every row (zeros for
        text-only rows): float32 logits [B, T', V] and the plan (its `labels` aligned with the logits).
        packing: the samples run as one row without padding (logits [1, sum of lengths, V])."""
        host = [None if t is None else t.detach().cpu().numpy() for t in (input_ids, attention_mask, labels)]
        feats = None if pixel_values is None else self.encode_images(pixel_values)
        plan = plan_splice(host[0], 0 if feats is None else feats.shape[1], host[1], host[2], max_length, padding_side)
        if packing:
            plan = pack_plan(plan)
        dev = self.model.embed_tokens.weight.device
        if feats is None:
            embeds = self.splice(plan)
        else:  # the MoE runs on every row: vision, projector and MoE stay in the graph on every rank (ZeRO-3/FSDP)
            tok = self.embed_tokens(torch.from_numpy(plan.text_ids).to(dev))
            visual = self.apply_moe(tok, torch.from_numpy(plan.context).to(dev), feats)
            rows = torch.from_numpy(plan.image_rows).to(dev)
            embeds = self.place(plan, tok, visual[rows] if len(plan.image_rows) else None) + 0.0 * visual.sum()
        mask, pos = (torch.from_numpy(a).to(dev) for a in (plan.attention_mask, plan.position_ids))
        if plan.cu_seqlens is not None:
            return self.lm_logits(self.packed_hidden_states(embeds, pos, plan.cu_seqlens)), plan
        return self.lm_logits(self.hidden_states(embeds, mask, pos)), plan


def causal_lm_loss_sum(logits: torch.Tensor, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross entropy over label tokens, and their count (normalize globally).
    labels: [B, T'] (a tensor, or the plan's numpy labels)."""
    labels = torch.as_tensor(labels, device=logits.device)
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (shift_labels != IGNORE_INDEX).sum()


def num_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


