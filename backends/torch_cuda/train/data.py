"""The shared LLaVA data (parrot.training.data) behind a torch DataLoader: micro-batches are formatted,
their images decoded and collated in worker processes, in the order the step plan fixes.

Under sharding every rank must run as many forwards per step as the others (each one gathers
parameters collectively): when a final partial global batch leaves a rank fewer micro-batches, it
gets filler micro-batches (a real sample with every label ignored: no loss, no gradient)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from parrot.constants import IGNORE_INDEX
from parrot.training.data import LlavaData, collate
from parrot.training.schedule import StepPlan


class MicroBatches(Dataset):
    def __init__(self, data: LlavaData, micro_batches: list[tuple[list[int], bool]], pad_id: int):
        self.data, self.micro_batches, self.pad_id = data, micro_batches, pad_id

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        indices, filler = self.micro_batches[i]
        batch = collate([self.data.item(j) for j in indices], self.pad_id)
        if filler:
            batch["labels"][:] = IGNORE_INDEX
            batch.update(num_label_tokens=0, num_tokens=0, padded_tokens=0)
        return batch


def rank_micro_batches(plan: StepPlan, step: int, rank: int, world_size: int) -> list[tuple[list[int], bool]]:
    """(sample indices, is filler) of each micro-batch `rank` runs in `step`: as many as the busiest rank."""
    own = [(mb, False) for mb in plan.micro_batches(step, rank)]
    most = max(len(plan.micro_batches(step, r)) for r in range(world_size))
    return own + [(plan.global_batch_at(step)[:1], True)] * (most - len(own))


def _to_torch(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def micro_batch_loader(
    data: LlavaData, plan: StepPlan, start_step: int, pad_id: int, num_workers: int, rank: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, list[int]]:
    """Micro-batches of steps start_step.. in order, and how many micro-batches each step has."""
    steps = [rank_micro_batches(plan, s, rank, plan.world_size) for s in range(start_step, plan.total_steps)]
    flat = [mb for step in steps for mb in step]
    num_workers = min(num_workers, os.cpu_count() or 1)  # more workers than cores only thrash
    loader = DataLoader(
        MicroBatches(data, flat, pad_id), batch_size=None, shuffle=False, num_workers=num_workers,
        collate_fn=_to_torch, pin_memory=pin_memory, persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(plan.seed),  # worker seeds never draw from the global RNG
    )
    return loader, [len(s) for s in steps]
