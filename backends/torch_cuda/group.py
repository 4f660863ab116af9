"""A data-parallel process group for work that shards its inputs (`parrot eval` under torchrun): gloo on
the CPU, NCCL on CUDA; barriers and one broadcast of a Python object. (Training's group: train/dist.py.)"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class ProcessGroup:
    def __init__(self, device: str):
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(hours=12))

    def barrier(self) -> None:
        dist.barrier()

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        dist.barrier()
        dist.destroy_process_group()
