"""`parrot train --backend mlx`: the training loop on the MLX model (full fine-tuning, LoRA, QLoRA).

`MLXEngine` runs one step: count the global batch's label tokens -> for each micro-batch: forward
-> summed loss / that count -> gradients (accumulated) -> clip + AdamW step at the scheduled lr. The
run around it (resume, metrics, progress, checkpoints, export) is the shared one (parrot.training.loop),
as are the data order, step plan and lr schedule (parrot.training.schedule).
"""

from __future__ import annotations

import contextlib
import platform
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from parrot import registry
from parrot.errors import ParrotError
from parrot.training import PreparedRun
from parrot.training.evaluation import model_checkpoint
from parrot.training.loop import StepStats, run_steps
from parrot.training.schedule import StepPlan, cosine_lr_factor, warmup_steps

from .build import build_model, cast_frozen, enable_grad_checkpoint, set_trainable, trainable_summary
from .data import step_batches
from .export import export_adapter, export_model
from .optim import TorchAdamW, clip_grad_norm
from .state import BACKEND_MARK, load_state, save_state
from .step import loss_sum, prepare


def run_training(p: PreparedRun, stop_after: int | None = None, progress: bool = True) -> Path:
    """Trains a prepared run (`parrot.training.train` prepares it); returns the output directory."""
    tc, data, src = p.config, p.data, p.source
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    plan = StepPlan.for_run(tc, data)
    model = build_model(src, tc.seed)
    lora_modules = set_trainable(model, tc)
    cast_frozen(model, tc.dtype)
    p.echo(trainable_summary(model))
    if tc.gradient_checkpointing:
        enable_grad_checkpoint(model)
    if tc.packing:
        p.echo("packing: the samples of a micro-batch in one row, attention within each sample (SDPA per sample)")
    model.train()
    optimizer = TorchAdamW(tc.lr, tc.weight_decay, module_lrs=tc.module_lrs)
    optimizer.init(model.trainable_parameters())
    n_warmup = warmup_steps(plan.total_steps, tc.warmup_ratio)
    engine = MLXEngine(p, model, optimizer, lora_modules, plan, n_warmup)
    return run_steps(p, engine, plan, n_warmup, stop_after, progress)


class MLXEngine:
    """One optimizer step of the MLX model: gradients accumulated over the micro-batches, clipped, AdamW."""

    rank, world_size = 0, 1

    def __init__(self, p: PreparedRun, model, optimizer: TorchAdamW, lora_modules: list[str], plan: StepPlan,
                 n_warmup: int):
        self.p, self.model, self.optimizer, self.lora_modules = p, model, optimizer, lora_modules
        self.plan, self.n_warmup = plan, n_warmup
        self.num_visual = p.source.config.num_visual_tokens(p.source.tower.config)
        self.mode = ("qlora" if p.source.config.quantization else "lora") if p.config.lora else "full"

        def scaled_loss(mb, inv_count):
            s = loss_sum(model, mb)
            return s * inv_count, s

        self.loss_and_grad = nn.value_and_grad(model, scaled_loss)

    def describe(self) -> tuple[str, str]:
        return "", f"{self.mode} fine-tuning, {self.p.config.dtype} on MLX ({mx.default_device()})"

    def run_config_extra(self) -> dict[str, Any]:
        return {"mlx": mx.__version__, "device": str(mx.default_device()), "mode": self.mode,
                "lora_modules": len(self.lora_modules)}

    def state_extra(self) -> dict[str, Any]:
        return {"backend": BACKEND_MARK, "machine": platform.machine()}

    def load(self, checkpoint: Path, state: dict[str, Any]) -> None:
        if state.get("backend") != BACKEND_MARK:
            raise ParrotError(f"--resume: {checkpoint} was saved by the torch trainer; resume it with "
                              "--backend cpu/cuda, or start a new MLX run in another --output")
        load_state(self.model, self.optimizer, checkpoint)

    def batches(self, plan: StepPlan, start: int) -> Iterator[list[dict[str, Any]]]:
        return step_batches(self.p.data, plan, start, self.p.tokenizer.pad_id, self.p.config.num_workers)

    def step(self, step: int, micro: list[dict[str, Any]]) -> StepStats:
        tc = self.p.config
        mx.reset_peak_memory()
        n_labels = sum(b["num_label_tokens"] for b in micro)
        loss_total, count, grads = 0.0, 0, None
        for i, b in enumerate(micro):
            mx.random.seed(_dropout_seed(tc.seed, step, i))  # LoRA dropout masks: a function of the step
            mb = prepare(b, self.num_visual, tc.max_length, tc.packing)
            (_, s), g = self.loss_and_grad(mb, 1.0 / n_labels)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(s, grads)
            loss_total += float(s)
            count += mb.num_labels
        if count != n_labels:  # the data's count normalized the loss
            raise RuntimeError(f"step {step + 1}: the model saw {count} label tokens, the data counted {n_labels}")
        factor = cosine_lr_factor(step, self.plan.total_steps, self.n_warmup)
        lr = tc.lr * factor
        grads, norm = clip_grad_norm(grads, tc.max_grad_norm)
        self.optimizer.lr, self.optimizer.lr_factor = lr, factor
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state, norm)
        return StepStats(loss_total, n_labels, float(norm), lr, sum(b["num_tokens"] for b in micro),
                         sum(b["num_tokens" if tc.packing else "padded_tokens"] for b in micro),
                         mx.get_peak_memory() / 2**30)

    def save(self, directory: Path) -> None:
        save_state(self.model, self.optimizer, directory)

    def export(self, out: Path) -> str:
        tc, src = self.p.config, self.p.source
        if tc.lora:
            export_adapter(self.model, src, tc, self.lora_modules, out, self.plan.total_steps)
            return (f"saved the LoRA adapter to {out} (use it: parrot chat --model {src.tokenizer_dir} "
                    f"--adapter {out}; fuse it: parrot convert ... --fuse-adapter {out})")
        export_model(self.model, src, out, tc.dtype, tc.max_length, layout=tc.save_layout)
        return f"saved the trained model to {out} (next stage: --model {out})"

    @contextlib.contextmanager
    def eval_model(self) -> Iterator[Any]:
        """The trained model as a ParrotModel in eval mode (no LoRA dropout)."""
        from ..api import MLXParrot

        tc = self.p.config
        self.model.eval()
        try:
            yield MLXParrot.from_module(self.model, model_checkpoint(self.p.source), tc.dtype, registry.get(tc.backend))
        finally:
            self.model.train()

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


def _dropout_seed(seed: int, step: int, micro: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + micro) % 2**63
