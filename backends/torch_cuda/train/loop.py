"""`parrot train --backend cpu|cuda`: the two-stage training loop.

`TorchEngine` runs one step: count the global batch's label tokens -> for each micro-batch: forward
-> summed loss / that count -> backward -> clip + optimizer step + scheduler step. The loss is thus
the mean over every label token of the global batch, whatever the accumulation. Sharding lives
behind `Strategy`; the model code has none. The run around the step (resume, metrics, progress,
checkpoints, export) is the shared one (parrot.training.loop).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parrot import registry
from parrot.training import PreparedRun
from parrot.training.evaluation import model_checkpoint
from parrot.training.loop import StepStats, run_steps
from parrot.training.schedule import StepPlan, warmup_steps

from ..loading import TORCH_DTYPES
from ..model import causal_lm_loss_sum
from .build import build_model, enable_activation_checkpointing, packed_attention, set_trainable, trainable_summary
from .data import micro_batch_loader
from .dist import local_device
from .export import export_adapter, export_model
from .lora import apply_lora
from .state import load_rng, save_rng
from .strategy import OptimSpec, SingleProcess, Strategy


def run_training(p: PreparedRun, stop_after: int | None = None, progress: bool = True) -> Path:
    """Trains a prepared run (`parrot.training.train` prepares it); returns the output directory."""
    tc, data, src = p.config, p.data, p.source
    strategy = make_strategy(p)
    _seed_everything(tc.seed)
    plan = StepPlan.for_run(tc, data, strategy.world_size)
    # QLoRA: build on the host, so the float weights never fill the GPU before they are quantized
    model = build_model(src, "cpu" if tc.quantize else strategy.build_device, tc.seed)
    if tc.lora:
        lora_modules = apply_lora(model, tc)
    else:
        lora_modules = []
        set_trainable(model, tc.stage, tc.use_moe, tc.train_vision)
    p.echo(trainable_summary(model))
    if tc.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if tc.packing:
        attention = packed_attention(model, strategy.device)
        p.echo(f"packing: the samples of a micro-batch in one row, attention within each sample ({attention})")
    optim = OptimSpec(tc.lr, tc.weight_decay, tc.max_grad_norm, plan.total_steps,
                      warmup_steps(plan.total_steps, tc.warmup_ratio), tc.module_lrs)
    forward = strategy.prepare(model, optim)
    engine = TorchEngine(p, strategy, forward, lora_modules, plan.total_steps)
    return run_steps(p, engine, plan, optim.warmup_steps, stop_after, progress)


class TorchEngine:
    """One optimizer step of the torch model behind a `Strategy` (one process, DeepSpeed or FSDP2)."""

    def __init__(self, p: PreparedRun, strategy: Strategy, forward, lora_modules: list[str] | None = None,
                 total_steps: int = 0):
        self.p, self.strategy, self.forward = p, strategy, forward
        self.lora_modules, self.total_steps = lora_modules or [], total_steps
        self.device = strategy.device
        self.rank, self.world_size = strategy.rank, strategy.world_size
        self.micro_per_step: list[int] = []

    def describe(self) -> tuple[str, str]:
        sharding = self.strategy.describe()
        return (f" x {self.world_size} process(es){', ' + sharding if sharding else ''}",
                f"{self.p.config.dtype} on {self.device.type}")

    def run_config_extra(self) -> dict[str, Any]:
        return {"torch": torch.__version__, "device": str(self.device), **self.strategy.run_config_extra()}

    def state_extra(self) -> dict[str, Any]:
        return {"strategy": self.strategy.name, "world_size": self.world_size}

    def load(self, checkpoint: Path, state: dict[str, Any]) -> None:
        self.strategy.load(checkpoint)
        rng = checkpoint / f"rng-rank{self.rank}.safetensors"
        load_rng(rng if rng.is_file() else checkpoint / "rng-rank0.safetensors")  # more ranks than were saved

    def batches(self, plan: StepPlan, start: int) -> Iterator[list[dict[str, Any]]]:
        tc = self.p.config
        loader, per_step = micro_batch_loader(self.p.data, plan, start, self.p.tokenizer.pad_id, tc.num_workers,
                                              self.rank, pin_memory=self.device.type == "cuda")
        it = iter(loader)
        for n in per_step:
            yield [next(it) for _ in range(n)]

    def step(self, step: int, micro: list[dict[str, Any]]) -> StepStats:
        tc, strategy, device = self.p.config, self.strategy, self.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        n_labels = strategy.all_reduce_sum(sum(mb["num_label_tokens"] for mb in micro))
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        for i, mb in enumerate(micro):
            # ids, mask and labels stay on the host: the model plans the splice there (parrot.model.splice)
            logits, plan = self.forward(
                input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                pixel_values=mb["pixel_values"].to(device), labels=mb["labels"], max_length=tc.max_length,
                packing=tc.packing,
            )
            loss, n = causal_lm_loss_sum(logits, plan.labels)
            strategy.backward(loss / n_labels, last=i == len(micro) - 1)
            loss_sum += loss.detach()
            count += int(n)
        lr = strategy.lr()
        grad_norm = strategy.step()
        own = sum(mb["num_label_tokens"] for mb in micro)
        computed = "num_tokens" if tc.packing else "padded_tokens"  # positions the LLM ran
        if count != own:  # the data's count normalized the loss
            raise RuntimeError(f"step {step + 1}: the model saw {count} label tokens, the data counted {own}")
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return StepStats(
            loss_sum=strategy.all_reduce_sum(float(loss_sum)), label_count=int(n_labels), grad_norm=grad_norm,
            lr=lr, tokens=int(strategy.all_reduce_sum(sum(mb["num_tokens"] for mb in micro))),
            padded=int(strategy.all_reduce_sum(sum(mb[computed] for mb in micro))),
            peak_memory_gib=peak)

    def save(self, directory: Path) -> None:
        self.strategy.save(directory)
        save_rng(directory / f"rng-rank{self.rank}.safetensors")

    def export(self, out: Path) -> str:
        tc, src = self.p.config, self.p.source
        if tc.lora:
            export_adapter(self.strategy.model, src, tc, self.lora_modules, out, self.total_steps)
            return (f"saved the LoRA adapter (PEFT format) to {out} (use it: parrot chat --model "
                    f"{src.tokenizer_dir} --adapter {out}; fuse it: parrot convert ... --fuse-adapter {out})")
        export_model(self.strategy, self.p.source, out, self.p.config.dtype, self.p.config.max_length)
        return f"saved the trained model to {out} (next stage: --model {out})"

    @contextlib.contextmanager
    def eval_model(self) -> Iterator[Any]:
        """The trained model as a ParrotModel in eval mode, under the run's autocast (rank 0, one process)."""
        from ..api import TorchParrot

        tc, model = self.p.config, self.strategy.model
        view = TorchParrot.from_module(model, model_checkpoint(self.p.source), tc.dtype, registry.get(tc.backend))
        amp = (torch.autocast(self.device.type, dtype=TORCH_DTYPES[tc.dtype]) if tc.dtype != "float32"
               else contextlib.nullcontext())
        model.eval()
        try:
            with amp:
                yield view
        finally:
            model.train()

    def barrier(self) -> None:
        self.strategy.barrier()

    def close(self) -> None:
        self.strategy.close()


def make_strategy(p: PreparedRun) -> Strategy:
    """One process, DeepSpeed ZeRO or FSDP2, as the flags say (the process group starts here)."""
    tc = p.config
    dtype = TORCH_DTYPES[tc.dtype]
    device = local_device(registry.get(tc.backend).device)  # on CUDA: this process's GPU (LOCAL_RANK)
    if tc.strategy == "single":
        return SingleProcess(device, dtype)
    if tc.strategy == "fsdp":
        from .strategy_fsdp import FSDPStrategy

        return FSDPStrategy(device, dtype)
    from .strategy_deepspeed import DeepSpeedStrategy

    return DeepSpeedStrategy(device, p.deepspeed, p.echo)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
