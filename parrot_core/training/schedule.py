"""What each optimizer step trains on, and its learning rate: pure functions of the step index.

The data order of epoch e is a permutation seeded by (seed, e), independent of the batch size, so
batch 4 x 1 and batch 1 x 4 see the same global batches, and a resumed run needs only the step
index. A global batch (batch_size x grad_accum x world_size samples) never straddles two epochs:
the last one of an epoch may be smaller, and still makes a step. With `max_steps` the epochs
repeat (fresh permutations) until that many steps are done.

With `modality` (--group-by-modality-length, LLaVA's `get_modality_length_grouped_indices`) every
global batch holds image samples only or text-only samples only: each modality is permuted, cut into
mega-batches of 50 global batches sorted by length (longest first), those cut into global batches;
the full batches of both modalities are shuffled together and each modality's remainder comes last,
as a smaller batch of its own (LLaVA merges the two remainders into one mixed batch). Every sample
still appears once per epoch, and the layout is a function of (seed, epoch): resume stays exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepPlan:
    num_samples: int
    batch_size: int
    grad_accum: int
    seed: int
    epochs: int = 1
    max_steps: int | None = None
    world_size: int = 1
    modality: list[bool] | None = None  # per sample: has an image (group by modality); None: plain order
    lengths: list[int] | None = None  # per sample: tokens, for the length grouping within a modality
    _orders: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _layouts: dict[int, list[list[int]]] = field(default_factory=dict, repr=False)

    @classmethod
    def for_run(cls, tc, data, world_size: int = 1) -> StepPlan:
        """The plan of a run (a TrainConfig) over its data (a LlavaData)."""
        grouped = bool(getattr(tc, "group_by_modality_length", False))
        return cls(len(data), tc.batch_size, tc.grad_accum, tc.seed, tc.epochs, tc.max_steps, world_size,
                   [s.image is not None for s in data.samples] if grouped else None,
                   [s.length for s in data.samples] if grouped else None)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        if self.modality is not None:
            n_image = sum(self.modality)
            return math.ceil(n_image / self.global_batch) + math.ceil((self.num_samples - n_image) / self.global_batch)
        return math.ceil(self.num_samples / self.global_batch)

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps is not None else self.epochs * self.steps_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)}
        return self._orders[epoch]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, first sample offset in that epoch's order) of 0-based `step`."""
        epoch, j = divmod(step, self.steps_per_epoch)
        if self.modality is not None:
            return epoch, sum(len(b) for b in self.grouped_batches(epoch)[:j])
        return epoch, j * self.global_batch

    def global_batch_at(self, step: int) -> list[int]:
        epoch, start = self.position(step)
        if self.modality is not None:
            return self.grouped_batches(epoch)[step % self.steps_per_epoch]
        return self.order(epoch)[start:start + self.global_batch].tolist()

    def grouped_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of `epoch`, one modality each (see the module's docstring)."""
        if epoch not in self._layouts:
            rng = np.random.default_rng([self.seed, epoch, 1])
            g, mega = self.global_batch, 50 * self.global_batch
            lengths = self.lengths or [0] * self.num_samples
            full, rest = [], []
            for flag in (True, False):
                idx = np.flatnonzero(np.asarray(self.modality) == flag)
                idx = idx[rng.permutation(len(idx))].tolist()
                ordered = [i for m in range(0, len(idx), mega)
                           for i in sorted(idx[m:m + mega], key=lambda i: -lengths[i])]  # stable: ties keep order
                batches = [ordered[b:b + g] for b in range(0, len(ordered), g)]
                full += [b for b in batches if len(b) == g]
                rest += [b for b in batches if len(b) < g]
            self._layouts = {epoch: [full[i] for i in rng.permutation(len(full))] + rest}
        return self._layouts[epoch]

    def micro_batches(self, step: int, rank: int = 0) -> list[list[int]]:
        """Sample indices of each micro-batch `rank` runs in 0-based `step` (chunks rank, rank + world, ...)."""
        g = self.global_batch_at(step)
        chunks = [g[i:i + self.batch_size] for i in range(0, len(g), self.batch_size)]
        return chunks[rank::self.world_size]


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def cosine_lr_factor(step: int, total_steps: int, num_warmup: int) -> float:
    """The multiplier of the peak lr at 0-based `step`: linear warmup, then cosine to 0 (transformers')."""
    if step < num_warmup:
        return step / max(1, num_warmup)
    progress = (step - num_warmup) / max(1, total_steps - num_warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
