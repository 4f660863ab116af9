"""`--deepspeed ds_config.json`: DeepSpeed ZeRO (stage 2 or 3) around the unchanged model.

The JSON's "auto" fields are resolved from the run's flags (parrot.training.ds_config, transformers' rules).
DeepSpeed gets a torch AdamW and Parrot's warmup + cosine LambdaLR (no fused-Adam build); the loop
owns the accumulation boundary (a final partial global batch still makes a step) and normalizes the
loss itself, so DeepSpeed neither divides by the accumulation steps nor averages away the ranks.

Checkpoints are DeepSpeed-native (`engine.save_checkpoint`, tag "deepspeed"): `zero_to_fp32.py`
(which DeepSpeed copies next to them) and `parrot convert` consolidate them. Resuming with another
number of processes consolidates each trained parameter (master weights and Adam moments, read with
parrot.backends.torch_cuda.zero_checkpoint) and sets it into the new partitions. (DeepSpeed 0.19's universal checkpoint
resumes ZeRO-2 exactly but drifted after the first step at ZeRO-3 in our tests, so it is not used.)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from parrot.errors import ParrotError
from parrot.training.ds_config import ResolvedDeepSpeed

from ..zero_checkpoint import ZeroCheckpoint
from .dist import Collectives, init_process_group
from .strategy import OptimSpec, param_groups

TAG = "deepspeed"


def saved_world_size(directory: Path) -> int:
    return len(list((directory / TAG).glob("*_optim_states.pt")))


class DeepSpeedStrategy(Collectives):
    name = "deepspeed"

    def __init__(self, device: torch.device, resolved: ResolvedDeepSpeed, echo: Callable[..., None] = print):
        # DeepSpeed 0.19 calls c10d collectives that torch 2.13 deprecates, once per bucket
        warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
        init_process_group(device, use_deepspeed=True)
        self.device = device
        self.build_device = torch.device("cpu")  # DeepSpeed moves (and under ZeRO-3 partitions) the model
        self.resolved, self.stage, self.echo = resolved, resolved.stage, echo

    def prepare(self, model: nn.Module, optim: OptimSpec) -> Callable[..., Any]:
        import deepspeed

        r = self.resolved
        for note in r.notes:
            self.echo(f"--deepspeed: {note}")
        cfg = {**r.config, "steps_per_print": r.config.get("steps_per_print", 2**31 - 1)}
        model.train()
        optimizer = torch.optim.AdamW(
            param_groups(model, optim.weight_decay, optim.lr, optim.module_lrs), lr=optim.lr, betas=r.betas, eps=r.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, optim.lr_lambda)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=self.scheduler,
                                               config=cfg, dist_init_required=False)
        self.model = model
        return self.forward

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        # DeepSpeed averages gradients over the ranks; the loss is this rank's share of the global sum
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self) -> float:
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # ------------------------------------------------------------ checkpoints
    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=TAG)

    def load(self, directory: Path) -> None:
        n = saved_world_size(directory)
        if n == 0:
            raise ParrotError(f"{directory}: not a DeepSpeed checkpoint (no {TAG}/*_optim_states.pt); was the run "
                              "trained with --fsdp or in one process?")
        if n == self.world_size:
            path, _ = self.engine.load_checkpoint(str(directory), tag=TAG)
            if path is None:
                raise ParrotError(f"{directory}: DeepSpeed could not load this checkpoint")
        else:
            self.echo(f"{directory}: saved by {n} processes, loading into {self.world_size} (consolidate, reshard)")
            self._load_consolidated(ZeroCheckpoint(directory))

    def _load_consolidated(self, ckpt: ZeroCheckpoint) -> None:
        """Another world size: each trained parameter's float32 master weights and Adam moments, read whole
        from the checkpoint (as zero_to_fp32 consolidates them), set into this run's partitions."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        missing = [n for n, p in self.model.named_parameters() if p.requires_grad and n not in ckpt.trainable]
        if missing:
            raise ParrotError(f"{ckpt.directory}: no trained weights for {missing[:3]}; was it saved with other "
                              "--stage / --train-vision / --no-moe?")
        step = ckpt.adam_step()
        self._create_optimizer_state(step)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if not p.requires_grad:
                    continue  # frozen: as built from the source model
                full = ckpt.read(name).to(self.device)
                if self.stage == 3:
                    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                        if self.rank == 0:
                            p.data.copy_(full.to(p.dtype))
                else:
                    p.data.copy_(full.to(p.dtype))
                safe_set_full_fp32_param(p, full)
                for kind in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(p, ckpt.read(name, kind).to(self.device), kind)
        sched = ckpt.lr_scheduler_state()
        if sched is not None:
            self.scheduler.load_state_dict(sched)
            for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr  # the scheduler's state alone leaves the groups at their initial lr

    def _create_optimizer_state(self, step: torch.Tensor) -> None:
        """Adam's state for each flat float32 partition (DeepSpeed creates it at the first step), so the
        moments can be set before any step; then DeepSpeed's fragment links for ZeRO-1/2."""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        zero = self.engine.optimizer
        flats = zero.fp32_partitioned_groups_flat if self.stage == 3 else zero.single_partition_of_fp32_groups
        for flat in flats:
            zero.optimizer.state[flat] = {"step": step.clone().float(), "exp_avg": torch.zeros_like(flat),
                                          "exp_avg_sq": torch.zeros_like(flat)}
        if self.stage < 3:
            for lp_group, flat in zip(zero.bit16_groups, flats):
                lazy_init_hp_params_optimizer_state(lp_group, flat, zero.optimizer.state)
            zero._hp_optimizer_states_linked = True

    def export(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Each parameter gathered in turn (every rank takes part); float32 masters for trained ones."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        for name, p in self.model.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None:
                if self.stage == 3:
                    with deepspeed.zero.GatheredParameters([p]):
                        full = p.detach().clone()
                else:
                    full = p.detach()
            if self.rank == 0:
                yield name, full
            del full

    def describe(self) -> str:
        return f"DeepSpeed ZeRO-{self.stage}"

    def run_config_extra(self) -> dict[str, Any]:
        return {"deepspeed_config": self.resolved.file}

