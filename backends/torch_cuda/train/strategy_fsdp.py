"""`--fsdp`: FSDP2 (`fully_shard`), ZeRO-3 equivalent: parameters, gradients and optimizer state
sharded over the ranks, each block's parameters gathered for its forward and again for its backward.

Units, applied from outside the model: each Qwen2 decoder layer, each CLIP encoder layer, the vision
tower, the projector, the MoE; the root holds embeddings, final norm and lm_head (tied or not).
float32 master weights; on CUDA with a 16-bit --dtype, computation in that dtype
(MixedPrecisionPolicy) with float32 gradient reduction. Checkpoints are torch.distributed.checkpoint
(DCP) directories: any number of processes can load them.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from parrot.errors import ParrotError
from parrot.storage.fsutil import atomic_output_file

from ..model import ParrotForCausalLM
from .dist import Collectives, init_process_group
from .state import _jsonable
from .strategy import OptimSpec, clip_and_step, param_groups

SCHEDULER_NAME = "scheduler.json"


def shard_model(model: ParrotForCausalLM, mesh, mp: MixedPrecisionPolicy) -> None:
    """fully_shard on every block, then on the root (which keeps what no block holds)."""
    m = model.model
    units: list[nn.Module] = [*m.layers, *m.vision_tower.vision_tower.vision_model.encoder.layers,
                              m.vision_tower, m.mm_projector]
    if m.moe_model is not None:
        units.append(m.moe_model)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class FSDPStrategy(Collectives):
    name = "fsdp"

    def __init__(self, device: torch.device, compute_dtype: torch.dtype):
        # the projector's output is a view; nothing modifies the blocks' outputs in place (the parity tests check)
        warnings.filterwarnings("ignore", r"FSDP2-wrapped module .* returned a view tensor", UserWarning)
        init_process_group(device, use_deepspeed=False)
        self.device = device
        self.compute_dtype = compute_dtype
        self.build_device = torch.device("cpu")  # fully_shard moves each rank's shards to the device

    def prepare(self, model: nn.Module, optim: OptimSpec) -> Callable[..., Any]:
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        mp = MixedPrecisionPolicy()
        if self.device.type == "cuda" and self.compute_dtype != torch.float32:
            mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        shard_model(model, mesh, mp)
        model.train()
        self.model, self.optim = model, optim
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay, optim.lr, optim.module_lrs),
                                           lr=optim.lr, betas=(0.9, 0.999), eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, optim.lr_lambda)
        return model

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        (loss * self.world_size).backward()  # FSDP averages gradients over the ranks; the loss is a share of the sum

    def step(self) -> float:
        return float(_full(clip_and_step(self.params, self.optim.max_grad_norm, self.optimizer, self.scheduler)))

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # ------------------------------------------------------------ checkpoints (DCP)
    def save(self, directory: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(directory))
        if self.rank == 0:
            with atomic_output_file(directory / SCHEDULER_NAME) as f:
                json.dump(_jsonable(self.scheduler.state_dict()), f, indent=1)

    def load(self, directory: Path) -> None:
        if not (directory / ".metadata").is_file():
            raise ParrotError(f"{directory}: not an FSDP (DCP) checkpoint (no .metadata); was the run trained "
                              "with --deepspeed or in one process?")
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(directory))  # reshards: any saved world size
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        try:
            self.scheduler.load_state_dict(json.loads((directory / SCHEDULER_NAME).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise ParrotError(f"{directory / SCHEDULER_NAME}: unreadable ({e})") from None

    def export(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in self.model.named_parameters():
            full = _full(p.detach())  # every rank takes part in the gather
            if self.rank == 0:
                yield name, full
            del full
        dist.barrier()

    def describe(self) -> str:
        return "FSDP2"

    def run_config_extra(self) -> dict[str, Any]:
        return {}
