"""One micro-batch on the MLX model: the batched forward with labels and the summed token loss.

The splice is planned on the host (parrot's numpy batch already says where every token goes), so
the device sees one gather. Logits are computed only at the positions that predict a label token
(the LLM head over a 150k vocabulary is the largest activation; the other positions' logits do not
enter the loss), then next-token cross entropy in float32, summed: the trainer divides by the
global batch's label count, as the torch backend does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from parrot.constants import IGNORE_INDEX
from parrot.model.splice import SplicePlan, pack_plan, plan_splice

from ..model import ParrotForCausalLM


@dataclass
class MicroBatch:
    plan: SplicePlan
    pixels: mx.array | None  # [K, 3, H, W] of plan.image_rows
    rows: mx.array  # (rows, cols): positions whose next token is a label
    cols: mx.array
    targets: mx.array
    num_labels: int


def prepare(batch: dict[str, Any], num_visual: int, max_length: int | None, packing: bool = False) -> MicroBatch:
    """A collated numpy micro-batch (parrot.training.data.collate) planned for the MLX model (packing: its
    samples as one row without padding, parrot.model.splice.pack_plan)."""
    plan = plan_splice(batch["input_ids"], num_visual, batch["attention_mask"], batch["labels"], max_length)
    if packing:
        plan = pack_plan(plan)
    nxt = plan.labels[:, 1:]
    rows, cols = np.nonzero(nxt != IGNORE_INDEX)
    pixels = mx.array(batch["pixel_values"][plan.image_rows]) if len(plan.image_rows) else None
    return MicroBatch(plan, pixels, mx.array(rows.astype(np.int32)), mx.array(cols.astype(np.int32)),
                      mx.array(nxt[rows, cols].astype(np.int32)), int(len(rows)))


def hidden_states(model: ParrotForCausalLM, mb: MicroBatch) -> mx.array:
    feats = model.encode_images(mb.pixels) if mb.pixels is not None else None
    embeds = model.splice(mb.plan, feats)
    if mb.plan.cu_seqlens is not None:
        return model.packed_hidden_states(embeds, mb.plan.cu_seqlens)
    return model.hidden_states(embeds)


def loss_sum(model: ParrotForCausalLM, mb: MicroBatch) -> mx.array:
    """Summed next-token cross entropy over the micro-batch's label tokens (float32)."""
    h = hidden_states(model, mb)
    logits = model.lm_logits(h[mb.rows, mb.cols]).astype(mx.float32)  # [M, V]
    picked = mx.take_along_axis(logits, mb.targets[:, None], axis=-1)[:, 0]
    return mx.sum(mx.logsumexp(logits, axis=-1) - picked)


def full_logits(model: ParrotForCausalLM, mb: MicroBatch) -> mx.array:
    """float32 logits [B, T', V] at every spliced position (tests and diagnostics)."""
    return model.lm_logits(hidden_states(model, mb)).astype(mx.float32)
