"""The process group of a sharded run: torchrun / the deepspeed launcher set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a run that was not launched is a group of one (so
`--fsdp` / `--deepspeed` also work, and resume, in a single process). gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_launch_env() -> None:
    """Fills a one-process group's variables when no launcher set them."""
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))


def local_device(kind: str) -> torch.device:
    """The device of this process: the CPU, or the GPU LOCAL_RANK names (torchrun sets it)."""
    if kind != "cuda":
        return torch.device(kind)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def init_process_group(device: torch.device, use_deepspeed: bool) -> None:
    ensure_launch_env()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    elif not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)


class Collectives:
    """What the loop needs from the group beyond the sharding itself."""

    device: torch.device

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    def all_reduce_sum(self, value: float) -> float:
        t = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
