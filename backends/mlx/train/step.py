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
from parrot.model.splice import SplicePlan, plan_splice

from ..model import ParrotForCausalLM


@dataclass
class MicroBatch:
    plan: SplicePlan
    pixels: mx.array | None  # [K, 3, H, W] of plan.image_rows
    rows: mx.array  # (rows, cols): positions whose next token is a label
    cols: mx.array
    targets: mx.array
    num_labels: int


def prepare(batch: dict[str, Any], num_visual: int, max_length: int | None) -> MicroBatch:
    """A collated numpy micro-batch (parrot.training.data.collate) planned for the MLX model."""
    plan = plan_splice(batch["input_ids"], num_visual, batch["attention_mask"], batch["labels"], max_length)
    nxt = plan.labels[:, 1:]
    rows, cols = np.nonzero(nxt != IGNORE_INDEX)
    pixels = mx.array(batch["pixel_values"][plan.image_rows]) if len(plan.image_rows) else None
    return MicroBatch(plan, pixels, mx.array(rows.astype(np.int32)), mx.array(cols.astype(np.int32)),
                      mx.array(nxt[rows, cols].astype(np.int32)), int(len(rows)))


def loss_sum(model: ParrotForCausalLM, mb: MicroBatch) -> mx.array:
    """Summed next-token cross entropy over the micro-batch's label tokens (float32)."""
    feats = model.encode_images(mb.pixels) if mb.pixels is not None else None
    h = model.hidden_states(model.splice(mb.plan, feats))
    logits = model.lm_logits(h[mb.rows, mb.cols]).astype(mx.float32)  # [M, V]
    picked = mx.take_along_axis(logits, mb.targets[:, None], axis=-1)[:, 0]
    return mx.sum(mx.logsumexp(logits, axis=-1) - picked)


def full_logits(model: ParrotForCausalLM, mb: MicroBatch) -> mx.array:
    """float32 logits [B, T', V] at every spliced position (tests and diagnostics)."""
    feats = model.encode_images(mb.pixels) if mb.pixels is not None else None
    return model.lm_logits(model.hidden_states(model.splice(mb.plan, feats))).astype(mx.float32)
