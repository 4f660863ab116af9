"""How the model is placed, stepped and saved: the only thing that changes between one process,
DeepSpeed ZeRO and FSDP2. The training loop calls exactly this interface; the model code carries
no distributed code (torchtitan style). Implementations: `SingleProcess` (here),
`strategy_deepspeed.DeepSpeedStrategy` (--deepspeed) and `strategy_fsdp.FSDPStrategy` (--fsdp).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from parrot.training.schedule import cosine_lr_factor

from .state import load_optimizer, load_tensors, save_optimizer, save_tensors


@dataclass
class OptimSpec:
    """AdamW (transformers' adamw_torch defaults) with warmup + cosine, gradient clipping."""

    lr: float
    weight_decay: float
    max_grad_norm: float | None
    total_steps: int
    warmup_steps: int
    module_lrs: dict[str, float] = field(default_factory=dict)  # "mm_projector" -> its peak lr (TrainConfig)

    @property
    def lr_lambda(self) -> Callable[[int], float]:
        return functools.partial(cosine_lr_factor, total_steps=self.total_steps, num_warmup=self.warmup_steps)


class Strategy(Protocol):
    name: str  # "single" | "deepspeed" | "fsdp"
    rank: int
    world_size: int
    device: torch.device  # where the batches go
    build_device: torch.device  # where the model is built before prepare()

    def prepare(self, model: nn.Module, optim: OptimSpec) -> Callable[..., Any]:
        """Places / shards the model, builds optimizer and scheduler; returns the callable forward."""

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """Accumulates the gradient of `loss` (`last`: the step's last micro-batch on this rank)."""

    def step(self) -> float:
        """Clips, steps optimizer and scheduler, zeroes the gradients; returns the pre-clip grad norm."""

    def lr(self) -> float: ...

    def save(self, directory: Path) -> None:
        """Trainable weights, optimizer and scheduler into `directory` (every rank calls it)."""

    def load(self, directory: Path) -> None: ...

    def export(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter, consolidated, by official name (rank 0; other ranks may yield nothing)."""

    def all_reduce_sum(self, value: float) -> float: ...

    def barrier(self) -> None: ...

    def close(self) -> None:
        """Ends the process group, if any (after the export)."""

    def describe(self) -> str:
        """The sharding, for the run's header line ("" for none, "FSDP2", "DeepSpeed ZeRO-3")."""

    def run_config_extra(self) -> dict[str, Any]:
        """What the run config records about the sharding."""


def clip_and_step(params, max_grad_norm: float | None, optimizer, scheduler) -> torch.Tensor:
    """Clips the gradients' global norm, steps optimizer and schedule, zeroes the gradients; returns the
    norm before clipping (a sharded tensor under FSDP2)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None,
                 module_lrs: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Trainable parameters: matrices decay, biases / norms / embeddings' 1-D tensors do not; modules with their
    own learning rate (`module_lrs`, e.g. {"mm_projector": 1e-4}: --mm-projector-lr) in groups of their own,
    after the --lr groups (the first group's lr is the one logged)."""
    module_lrs = module_lrs or {}
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            module = next((m for m in module_lrs if f"model.{m}." in name), "")
            groups.setdefault((module, p.ndim >= 2), []).append(p)
    out = []
    for module in ("", *module_lrs):
        for decay in (True, False):
            params = groups.get((module, decay), [])
            if params or not module:  # the two --lr groups always (as before), the others when they have any
                g = {"params": params, "weight_decay": weight_decay if decay else 0.0}
                if module:
                    g["lr"] = module_lrs[module]
                elif lr is not None:
                    g["lr"] = lr
                out.append(g)
    return out


class SingleProcess:
    """One process, one device. With a 16-bit compute dtype, trainable weights stay float32 (master)
    and the forward runs under autocast; frozen weights are stored in the compute dtype."""

    name = "single"
    rank = 0
    world_size = 1

    def __init__(self, device: str | torch.device, compute_dtype: torch.dtype):
        self.device = torch.device(device)
        self.build_device = self.device
        self.compute_dtype = compute_dtype
        self.model: nn.Module | None = None

    def prepare(self, model: nn.Module, optim: OptimSpec) -> Callable[..., Any]:
        model.to(self.device)
        if self.compute_dtype != torch.float32:
            for p in model.parameters():
                if not p.requires_grad and p.is_floating_point():  # a 4-bit (QLoRA) base stays as it is
                    p.data = p.data.to(self.compute_dtype)
        model.train()
        self.model, self.optim = model, optim
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        groups = param_groups(model, optim.weight_decay, optim.lr, optim.module_lrs)
        self.optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(0.9, 0.999), eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, optim.lr_lambda)
        return self.forward

    def forward(self, *args, **kwargs):
        amp = (torch.autocast(self.device.type, dtype=self.compute_dtype)
               if self.compute_dtype != torch.float32 else contextlib.nullcontext())
        with amp:
            return self.model(*args, **kwargs)

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        loss.backward()

    def step(self) -> float:
        return float(clip_and_step(self.params, self.optim.max_grad_norm, self.optimizer, self.scheduler))

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _named_optimizer_params(self) -> list[str]:
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        return [name_of[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def save(self, directory: Path) -> None:
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        save_tensors(trainable, directory / "model.safetensors")
        save_optimizer(self.optimizer, self._named_optimizer_params(), self.scheduler.state_dict(), directory)

    def load(self, directory: Path) -> None:
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        load_tensors(trainable, directory / "model.safetensors")
        sched = load_optimizer(self.optimizer, self._named_optimizer_params(), directory)
        self.scheduler.load_state_dict(sched)

    def export(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in self.model.named_parameters():
            yield name, p.detach()

    def all_reduce_sum(self, value: float) -> float:
        return value

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return ""

    def run_config_extra(self) -> dict[str, Any]:
        return {}
