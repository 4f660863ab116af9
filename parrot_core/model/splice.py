"""The splice, planned once for every backend: where each row's visual tokens go.

Each row of a batch holds at most one image placeholder (-200); it is replaced by the N visual
tokens of its image. The plan is pure numpy: a backend embeds `text_ids`, computes the visual tokens
of `image_rows` (the MoE attends over `context`), and places everything with one gather,

    embeds = concat([word embeddings (B*T rows) | visual tokens (K*N rows) | one zero row])[gather]

then runs the LLM with `attention_mask` and `position_ids`. Truncation to `max_length` happens
after splicing (the official code's order). Right padding puts each row at the start (training);
left padding at the end (batched decoding), with positions counting from the row's first token.

`pack_plan` turns a right-padded training plan into one row without padding (padding-free training):
the rows' valid positions one after the other, each sample's positions from 0, `cu_seqlens` marking
where each sample starts; the LLM must attend within a sample only (causal attention per sample,
or flash-attention's varlen kernels). The MoE's text context stays per sample (it runs before the gather).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ..errors import ParrotError

PADDING_SIDES = ("right", "left")


@dataclass
class SplicePlan:
    text_ids: np.ndarray  # [B, T] int64: the ids to embed (the placeholder and padding read as 0)
    context: np.ndarray  # [B, T] bool: the MoE's text context (valid text tokens whose label is ignored)
    image_rows: np.ndarray  # [K] int64: the rows holding a placeholder, in order
    gather: np.ndarray  # [B, T'] int64 into [text (B*T) | visual (K*N) | zero row]
    attention_mask: np.ndarray  # [B, T'] bool
    position_ids: np.ndarray  # [B, T'] int64
    labels: np.ndarray | None  # [B, T'] the labels at their spliced positions (IGNORE_INDEX elsewhere)
    lengths: np.ndarray  # [B] valid positions of each row
    num_visual: int  # N
    cu_seqlens: np.ndarray | None = None  # packed plans: [S + 1] int32 offsets of the samples in the one row

    @property
    def shape(self) -> tuple[int, int]:
        return self.gather.shape


def plan_splice(
    input_ids: np.ndarray,
    num_visual: int,
    attention_mask: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    max_length: int | None = None,
    padding_side: str = "right",
) -> SplicePlan:
    """Plans a batch: input_ids [B, T] (at most one -200 per row; rows padded on the right, `attention_mask`
    marking the valid positions); num_visual = N (0: the placeholders are dropped, for text-only
    forwards). The MoE's text context is every valid text token whose label is ignored (all of them
    without labels, i.e. at inference)."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    ids = np.asarray(input_ids, dtype=np.int64)
    B, T = ids.shape
    valid = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    is_img = (ids == IMAGE_TOKEN_INDEX) & valid
    if (is_img.sum(1) > 1).any():
        raise ParrotError("a prompt holds more than one image placeholder (-200); Parrot takes one image")
    text = valid & ~is_img
    context = text if labels is None else text & (np.asarray(labels) == IGNORE_INDEX)
    rows = np.flatnonzero(is_img.any(1)) if num_visual else np.zeros(0, np.int64)

    width = np.where(is_img, num_visual, 1) * valid
    start = np.cumsum(width, 1) - width
    lengths = width.sum(1)
    T2 = int(lengths.max()) if B else 0
    if max_length is not None:
        T2 = min(T2, max_length)
        lengths = np.minimum(lengths, T2)
    offset = T2 - lengths if padding_side == "left" else np.zeros_like(lengths)
    start = start + offset[:, None]
    end = offset + lengths

    zero_row = B * T + len(rows) * num_visual
    gather = np.full((B, T2), zero_row, np.int64)
    b, t = np.nonzero(text & (start < end[:, None]))
    gather[b, start[b, t]] = b * T + t
    new_labels = None
    if labels is not None:
        new_labels = np.full((B, T2), IGNORE_INDEX, np.asarray(labels).dtype)
        new_labels[b, start[b, t]] = np.asarray(labels)[b, t]
    for k, r in enumerate(rows):
        p = start[r, int(np.flatnonzero(is_img[r])[0])]
        n = max(0, min(num_visual, end[r] - p))
        gather[r, p:p + n] = B * T + k * num_visual + np.arange(n)

    ar = np.arange(T2)[None]
    mask = (ar >= offset[:, None]) & (ar < end[:, None])
    positions = np.maximum(ar - offset[:, None], 0)
    return SplicePlan(np.where(text, ids, 0), context, rows.astype(np.int64), gather, mask, positions,
                      new_labels, lengths, num_visual)


def pack_plan(plan: SplicePlan) -> SplicePlan:
    """One row holding the right-padded plan's samples back to back (no padding): the same gather entries,
    positions and labels, in row order. The first position of each sample gets no label, so no sample
    learns to predict the next one's first token (unpacked, that label is never used: the shift drops
    it). The loss over the packed row's labels is then the padded batch's, term by term."""
    if plan.labels is None:
        raise ValueError("pack_plan packs training plans (with labels)")
    if not (plan.attention_mask == (np.arange(plan.shape[1])[None] < plan.lengths[:, None])).all():
        raise ValueError("pack_plan needs a right-padded plan")
    valid = plan.attention_mask
    cu = np.concatenate([[0], np.cumsum(plan.lengths)]).astype(np.int32)
    labels = plan.labels[valid].copy()
    labels[cu[:-1][plan.lengths > 0]] = IGNORE_INDEX
    total = int(cu[-1])
    return SplicePlan(plan.text_ids, plan.context, plan.image_rows, plan.gather[valid][None],
                      np.ones((1, total), bool), plan.position_ids[valid][None], labels[None],
                      np.array([total]), plan.num_visual, cu)


def plan_prompts(prompts: Sequence[Sequence[int]], num_visual: int, padding_side: str = "right") -> SplicePlan:
    """Plans prompts of different lengths (lists of ids) as one batch, padded on `padding_side`."""
    T = max((len(p) for p in prompts), default=0)
    ids = np.zeros((len(prompts), T), np.int64)
    mask = np.zeros((len(prompts), T), bool)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = p, True
    return plan_splice(ids, num_visual, mask, padding_side=padding_side)
