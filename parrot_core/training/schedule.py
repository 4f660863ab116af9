"""What each optimizer step trains on, and its learning rate: pure functions of the step index.

The data order of epoch e is a permutation seeded by (seed, e), independent of the batch size, so
batch 4 x 1 and batch 1 x 4 see the same global batches, and a resumed run needs only the step
index. A global batch (batch_size x grad_accum x world_size samples) never straddles two epochs:
the last one of an epoch may be smaller, and still makes a step. With `max_steps` the epochs
repeat (fresh permutations) until that many steps are done.
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
    _orders: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
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
        return epoch, j * self.global_batch

    def global_batch_at(self, step: int) -> list[int]:
        epoch, start = self.position(step)
        return self.order(epoch)[start:start + self.global_batch].tolist()

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
