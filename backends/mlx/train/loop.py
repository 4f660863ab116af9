"""`parrot train --backend mlx`: the training loop on the MLX model (full fine-tuning, LoRA, QLoRA).

The same loop as the torch backend's: count the global batch's label tokens -> for each
micro-batch: forward -> summed loss / that count -> gradients (accumulated) -> clip + AdamW step
at the scheduled lr -> log -> checkpoint. Data order, step plan, lr schedule, metrics rows and
checkpoint layout are shared with the torch trainer (parrot.schedule, parrot.run_dir).
"""

from __future__ import annotations

import platform
import random
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map
from tqdm import tqdm

from parrot.errors import ParrotError
from parrot.run_dir import STATE_NAME, host_rng_state, read_json, set_host_rng_state, write_json
from parrot.schedule import StepPlan, cosine_lr_factor, warmup_steps
from parrot.train_source import write_model_description
from parrot.training import PreparedRun

from .build import build_model, cast_frozen, enable_grad_checkpoint, set_trainable, trainable_summary
from .data import step_batches
from .export import MODEL_DIR, export_adapter, export_model
from .optim import TorchAdamW, clip_grad_norm
from .state import BACKEND_MARK, load_state, save_state
from .step import loss_sum, prepare


def run_training(p: PreparedRun, stop_after: int | None = None, progress: bool = True) -> Path:
    """Trains a prepared run (`parrot.training.train` prepares it); returns the output directory."""
    tc, run, data, tokenizer, src = p.config, p.run, p.data, p.tokenizer, p.source
    echo = p.echo
    random.seed(tc.seed)
    np.random.seed(tc.seed)

    # ---- model
    plan = StepPlan(len(data), tc.batch_size, tc.grad_accum, tc.seed, tc.epochs, tc.max_steps)
    model = build_model(src, tc.seed)
    lora_modules = set_trainable(model, tc)
    cast_frozen(model, tc.dtype)
    echo(trainable_summary(model))
    if tc.gradient_checkpointing:
        enable_grad_checkpoint(model)
    model.train()
    n_warmup = warmup_steps(plan.total_steps, tc.warmup_ratio)
    optimizer = TorchAdamW(tc.lr, tc.weight_decay)
    optimizer.init(model.trainable_parameters())
    num_visual = src.config.num_visual_tokens(src.tower.config)

    def scaled_loss(mb, inv_count):
        s = loss_sum(model, mb)
        return s * inv_count, s

    loss_and_grad = nn.value_and_grad(model, scaled_loss)

    # ---- resume
    start = 0
    if p.resume_from is not None:
        state = read_json(p.resume_from / STATE_NAME)
        if state.get("backend") != BACKEND_MARK:
            raise ParrotError(f"--resume: {p.resume_from} was saved by the torch trainer; resume it with "
                              "--backend cpu/cuda, or start a new MLX run in another --output")
        load_state(model, optimizer, p.resume_from)
        start = state["step"]
        set_host_rng_state(state["host_rng"])
        echo(f"resumed from {p.resume_from} (step {start} of {plan.total_steps})")
    mode = ("qlora" if src.config.quantization else "lora") if tc.lora else "full"
    run_config = p.run_config(plan, n_warmup, mlx=mx.__version__, device=str(mx.default_device()), mode=mode,
                              lora_modules=len(lora_modules))
    run.truncate_metrics(start)
    write_json(run.run_config, run_config)
    echo(f"{plan.total_steps} steps of {plan.global_batch} samples ({tc.batch_size} x {tc.grad_accum} accumulation)"
         f", lr {tc.lr:g}, {mode} fine-tuning, {tc.dtype} on MLX ({mx.default_device()})")

    # ---- the loop
    batches = step_batches(data, plan, start, tokenizer.pad_id, tc.num_workers)
    bar = tqdm(total=plan.total_steps, initial=start, desc=f"stage {tc.stage}", unit="step",
               disable=not progress, dynamic_ncols=True)
    peak = 0.0
    for step in range(start, plan.total_steps):
        if stop_after is not None and step >= stop_after:
            break
        t0 = time.perf_counter()
        mx.reset_peak_memory()
        micro = next(batches)
        n_labels = sum(b["num_label_tokens"] for b in micro)
        loss_total, count, grads = 0.0, 0, None
        for i, b in enumerate(micro):
            mx.random.seed(_dropout_seed(tc.seed, step, i))  # LoRA dropout masks: a function of the step
            mb = prepare(b, num_visual, tc.max_length)
            (_, s), g = loss_and_grad(mb, 1.0 / n_labels)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(s, grads)
            loss_total += float(s)
            count += mb.num_labels
        if count != n_labels:  # the data's count normalized the loss
            raise RuntimeError(f"step {step + 1}: the model saw {count} label tokens, the data counted {n_labels}")
        lr = tc.lr * cosine_lr_factor(step, plan.total_steps, n_warmup)
        grads, norm = clip_grad_norm(grads, tc.max_grad_norm)
        optimizer.lr = lr
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, norm)
        dt = time.perf_counter() - t0
        tokens = sum(b["num_tokens"] for b in micro)
        padded = sum(b["padded_tokens"] for b in micro)
        loss = loss_total / n_labels
        row = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": float(norm), "tokens_per_s": tokens / dt,
               "padding_fraction": 1 - tokens / padded, "num_tokens": int(tokens), "num_label_tokens": int(n_labels),
               "epoch": plan.position(step)[0], "peak_memory_gib": mx.get_peak_memory() / 2**30}
        run.log_metrics(row)
        peak = max(peak, row["peak_memory_gib"])
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:,.0f}",
                        mem=f"{row['peak_memory_gib']:.2f}G")
        bar.update(1)
        if (step + 1) % tc.save_every == 0 or step + 1 == plan.total_steps:
            _save_checkpoint(p, model, optimizer, step + 1, plan, run_config)
    bar.close()
    if peak:
        size = f"{peak:.2f} GiB" if peak >= 1 else f"{peak * 1024:.0f} MiB"
        echo(f"peak memory: {size} (MLX, {mx.default_device()})")

    done = run.latest_checkpoint() is not None and run.checkpoint_steps()[-1] >= plan.total_steps
    if stop_after is not None and not done:
        echo(f"stopped after step {min(stop_after, plan.total_steps)}; continue with --resume")
        return run.root
    if tc.lora:
        export_adapter(model, src, tc, lora_modules, run.root, plan.total_steps)
        echo(f"saved the LoRA adapter to {run.root} (use it: parrot chat --model {src.tokenizer_dir} "
             f"--adapter {run.root}; fuse it: parrot convert ... --fuse-adapter {run.root})")
    else:
        export_model(model, src, run.root, tc.dtype, tc.max_length, layout=tc.save_layout)
        echo(f"saved the trained model to {run.root} (next stage: --model {run.root})")
    return run.root


def _dropout_seed(seed: int, step: int, micro: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + micro) % 2**63


def _save_checkpoint(p: PreparedRun, model, optimizer: TorchAdamW, step: int, plan: StepPlan, run_config: dict) -> None:
    run, keep = p.run, p.config.save_total_limit
    tmp = run.staging_dir(step)
    save_state(model, optimizer, tmp)
    write_json(tmp / "run_config.json", run_config)
    if not p.config.lora:  # what `parrot convert step-N` needs beside the trained tensors (as the torch trainer)
        write_model_description(p.source, tmp / MODEL_DIR, p.config.dtype, p.config.max_length)
    epoch, offset = plan.position(step)
    state = {"step": step, "epoch": epoch, "sample_offset": offset, "total_steps": plan.total_steps,
             "host_rng": host_rng_state(), "backend": BACKEND_MARK, "machine": platform.machine()}
    run.commit(tmp, step, state, keep)
