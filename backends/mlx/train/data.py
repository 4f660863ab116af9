"""The shared LLaVA data (parrot.training.data) for the MLX trainer: each step's micro-batches, formatted,
decoded and collated in numpy by worker threads a few steps ahead, in the order the step plan fixes."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from parrot.training.data import LlavaData, collate
from parrot.training.schedule import StepPlan


def step_batches(data: LlavaData, plan: StepPlan, start_step: int, pad_id: int,
                 num_workers: int) -> Iterator[list[dict[str, Any]]]:
    """For each step from `start_step` on: its collated micro-batches (numpy)."""
    def load(step: int) -> list[dict[str, Any]]:
        return [collate([data.item(i) for i in mb], pad_id) for mb in plan.micro_batches(step)]

    steps = range(start_step, plan.total_steps)
    if num_workers == 0:
        for s in steps:
            yield load(s)
        return
    with ThreadPoolExecutor(num_workers) as ex:
        ahead: deque = deque()
        it = iter(steps)
        for s in it:
            ahead.append(ex.submit(load, s))
            if len(ahead) > num_workers:
                break
        while ahead:
            batch = ahead.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                ahead.append(ex.submit(load, nxt))
            yield batch
