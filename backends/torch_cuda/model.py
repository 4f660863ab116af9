"""The Parrot model in PyTorch, on transformers' Qwen2 and CLIP vision modules.

Module names follow the official checkpoint keys, so official safetensors load without renaming:
model.{embed_tokens,layers,norm}, model.vision_tower.vision_tower.vision_model.*,
model.mm_projector.{0,2}, model.moe_model.{gate,experts.N}, lm_head. No distributed code here:
sharding is applied from outside.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, Qwen2Config, Qwen2Model
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPVisionEmbeddings

from parrot.config import ParrotConfig, VisionConfig
from parrot.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

# transformers renamed `past_key_values` to `cache` in 5.2x; pass whichever this version takes
_CACHE_KW = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"


def qwen2_config(cfg: ParrotConfig) -> Qwen2Config:
    d = cfg.llm_dict()
    d.pop("model_type")
    rope_scaling = d.pop("rope_scaling")
    qc = Qwen2Config(**d, use_sliding_window=False)
    qc.rope_parameters = {**(rope_scaling or {}), "rope_type": (rope_scaling or {}).get("rope_type", "default"),
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


@dataclass
class Spliced:
    inputs_embeds: torch.Tensor  # [B, T', C]
    attention_mask: torch.Tensor  # [B, T'] bool
    position_ids: torch.Tensor  # [B, T']
    labels: torch.Tensor | None  # [B, T']
    lengths: torch.Tensor  # [B] valid length of each row


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
    def splice(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        max_length: int | None = None,
        padding_side: str = "right",
        expert_outputs: torch.Tensor | None = None,
    ) -> Spliced:
        """Replaces each row's image placeholder by its visual tokens, vectorized over the batch.

        input_ids [B, T] with at most one -200 per row; image_features [B, N, C] before the MoE (row b
        is used when row b has a placeholder). The MoE's text context is every valid text token whose
        label is ignored (all of them at inference). Truncation to max_length happens after splicing.
        expert_outputs: cached `expert_outputs(image_features)` (generation reuses them across turns).
        """
        B, T = input_ids.shape
        dev = input_ids.device
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        is_img = (input_ids == IMAGE_TOKEN_INDEX) & valid
        text_ids = torch.where(is_img | ~valid, torch.zeros_like(input_ids), input_ids)
        tok = self.model.embed_tokens(text_ids)  # [B, T, C]
        visual = None
        if image_features is not None:
            ctx = valid & ~is_img
            if labels is not None:
                ctx = ctx & (labels == IGNORE_INDEX)
            visual = self.apply_moe(tok, ctx, image_features, expert_outputs)
        N = 0 if visual is None else visual.shape[1]
        width = torch.where(is_img, N, 1) * valid
        start = width.cumsum(1) - width
        lengths = width.sum(1)
        T2 = int(lengths.max())
        if max_length is not None:
            T2 = min(T2, max_length)
            lengths = lengths.clamp(max=T2)
        offset = (T2 - lengths) if padding_side == "left" else torch.zeros_like(lengths)
        start = start + offset[:, None]
        end_row = (offset + lengths)[:, None]

        text_sel = valid & ~is_img & (start < end_row)
        b, t = text_sel.nonzero(as_tuple=True)
        pos = start[b, t]
        embeds = tok.new_zeros(B, T2, tok.shape[-1]).index_put((b, pos), tok[b, t])
        new_labels = None
        if labels is not None:
            new_labels = torch.full((B, T2), IGNORE_INDEX, dtype=labels.dtype, device=dev)
            new_labels = new_labels.index_put((b, pos), labels[b, t])
        if visual is not None:
            bi, ti = is_img.nonzero(as_tuple=True)
            vpos = start[bi, ti][:, None] + torch.arange(N, device=dev)[None]  # [K, N]
            keep = vpos < end_row[bi]
            rows = bi[:, None].expand(-1, N)[keep]
            embeds = embeds.index_put((rows, vpos[keep]), visual[bi][keep].to(embeds.dtype))
            # every image row stays in the graph (text-only batches under ZeRO-3 / FSDP)
            embeds = embeds + 0.0 * visual.sum()
        ar = torch.arange(T2, device=dev)[None]
        mask = (ar >= offset[:, None]) & (ar < end_row)
        position_ids = (ar - offset[:, None]).clamp(min=0)
        return Spliced(embeds, mask, position_ids, new_labels, lengths)

    # ------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        max_length: int | None = None,
        padding_side: str = "right",
    ) -> tuple[torch.Tensor, Spliced]:
        """Full forward (no cache): float32 logits [B, T', V] and the spliced batch (labels aligned)."""
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        s = self.splice(input_ids, attention_mask, image_features, labels, max_length, padding_side)
        h = self.decoder(s.inputs_embeds, s.attention_mask, s.position_ids)
        return self.lm_head(h).float(), s

    def decoder(self, inputs_embeds, attention_mask, position_ids, cache=None) -> torch.Tensor:
        """The Qwen2 stack: final-norm hidden states. `cache` (a transformers Cache) is updated in place."""
        out = self.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(), position_ids=position_ids,
            use_cache=cache is not None, **{_CACHE_KW: cache},
        )
        return out.last_hidden_state


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross entropy over label tokens, and their count (normalize globally)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (shift_labels != IGNORE_INDEX).sum()


def num_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


