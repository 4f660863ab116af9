"""`parrot train --backend cpu|cuda`: the two-stage training loop.

One step: count the global batch's label tokens -> for each micro-batch: forward -> summed loss /
that count -> backward -> clip + optimizer step + scheduler step -> log -> checkpoint. The loss is
thus the mean over every label token of the global batch, whatever the accumulation. Sharding
lives behind `Strategy`; the model code has none.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from parrot.errors import ParrotError
from parrot.run_dir import STATE_NAME, host_rng_state, read_json, set_host_rng_state, write_json
from parrot.schedule import StepPlan, warmup_steps
from parrot.train_config import TrainConfig
from parrot.train_source import write_model_description
from parrot.training import PreparedRun

from ..loading import TORCH_DTYPES
from ..model import causal_lm_loss_sum
from .build import build_model, enable_activation_checkpointing, set_trainable, trainable_summary
from .data import micro_batch_loader
from .dist import local_device
from .export import MODEL_DIR, export_model
from .state import load_rng, save_rng
from .strategy import OptimSpec, SingleProcess, Strategy


def run_training(p: PreparedRun, stop_after: int | None = None, progress: bool = True) -> Path:
    """Trains a prepared run (`parrot.training.train` prepares it); returns the output directory."""
    tc, run, data, tokenizer, src = p.config, p.run, p.data, p.tokenizer, p.source
    strategy = make_strategy(p)
    device = strategy.device
    echo = p.echo

    # ---- model
    _seed_everything(tc.seed)
    plan = StepPlan(len(data), tc.batch_size, tc.grad_accum, tc.seed, tc.epochs, tc.max_steps, strategy.world_size)
    model = build_model(src, strategy.build_device, tc.seed)
    set_trainable(model, tc.stage, tc.use_moe, tc.train_vision)
    echo(trainable_summary(model))
    if tc.gradient_checkpointing:
        enable_activation_checkpointing(model)
    optim = OptimSpec(tc.lr, tc.weight_decay, tc.max_grad_norm, plan.total_steps,
                      warmup_steps(plan.total_steps, tc.warmup_ratio))
    forward = strategy.prepare(model, optim)

    # ---- resume
    start = 0
    if p.resume_from is not None:
        strategy.load(p.resume_from)
        state = read_json(p.resume_from / STATE_NAME)
        start = state["step"]
        set_host_rng_state(state["host_rng"])
        rng = p.resume_from / f"rng-rank{strategy.rank}.safetensors"
        load_rng(rng if rng.is_file() else p.resume_from / "rng-rank0.safetensors")  # more ranks than were saved
        echo(f"resumed from {p.resume_from} (step {start} of {plan.total_steps})")
    extra = strategy.run_config_extra() if hasattr(strategy, "run_config_extra") else {}
    run_config = p.run_config(plan, optim.warmup_steps, torch=torch.__version__, device=str(device), **extra)
    if strategy.rank == 0:
        run.truncate_metrics(start)
        write_json(run.run_config, run_config)
    sharding = {"single": "", "fsdp": ", FSDP2", "deepspeed": f", DeepSpeed ZeRO-{getattr(strategy, 'stage', '?')}"}
    echo(f"{plan.total_steps} steps of {plan.global_batch} samples ({tc.batch_size} x {tc.grad_accum} accumulation"
         f" x {strategy.world_size} process(es){sharding[strategy.name]}), lr {tc.lr:g}, {tc.dtype} on {device.type}")

    # ---- the loop
    loader, micro_per_step = micro_batch_loader(data, plan, start, tokenizer.pad_id, tc.num_workers,
                                                strategy.rank, pin_memory=device.type == "cuda")
    batches = iter(loader)
    bar = tqdm(total=plan.total_steps, initial=start, desc=f"stage {tc.stage}", unit="step",
               disable=not progress or strategy.rank != 0, dynamic_ncols=True)
    for step in range(start, plan.total_steps):
        if stop_after is not None and step >= stop_after:
            break
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        micro = [next(batches) for _ in range(micro_per_step[step - start])]
        n_labels = strategy.all_reduce_sum(sum(mb["num_label_tokens"] for mb in micro))
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.long, device=device)
        for i, mb in enumerate(micro):
            logits, spliced = forward(
                input_ids=mb["input_ids"].to(device), attention_mask=mb["attention_mask"].to(device),
                pixel_values=mb["pixel_values"].to(device), labels=mb["labels"].to(device), max_length=tc.max_length,
            )
            loss, n = causal_lm_loss_sum(logits, spliced.labels)
            strategy.backward(loss / n_labels, last=i == len(micro) - 1)
            loss_sum += loss.detach()
            count += n
        lr = strategy.lr()
        grad_norm = strategy.step()
        if int(count) != sum(mb["num_label_tokens"] for mb in micro):  # the data's count normalized the loss
            raise RuntimeError(f"step {step + 1}: the model saw {int(count)} label tokens, the data counted "
                               f"{sum(mb['num_label_tokens'] for mb in micro)}")
        loss = strategy.all_reduce_sum(float(loss_sum)) / n_labels
        dt = time.perf_counter() - t0
        tokens = strategy.all_reduce_sum(sum(mb["num_tokens"] for mb in micro))
        padded = strategy.all_reduce_sum(sum(mb["padded_tokens"] for mb in micro))
        row = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / dt,
               "padding_fraction": 1 - tokens / padded, "num_tokens": int(tokens), "num_label_tokens": int(n_labels),
               "epoch": plan.position(step)[0]}
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if strategy.rank == 0:
            run.log_metrics(row)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:,.0f}")
        bar.update(1)
        if (step + 1) % tc.save_every == 0 or step + 1 == plan.total_steps:
            _save_checkpoint(p, strategy, step + 1, plan, run_config)
    bar.close()

    done = run.latest_checkpoint() is not None and run.checkpoint_steps()[-1] >= plan.total_steps
    if stop_after is not None and not done:
        echo(f"stopped after step {min(stop_after, plan.total_steps)}; continue with --resume")
        strategy.close()
        return run.root
    export_model(strategy, src, run.root, tc.dtype, tc.max_length)
    strategy.close()
    echo(f"saved the trained model to {run.root} (next stage: --model {run.root})")
    return run.root


def make_strategy(p: PreparedRun) -> Strategy:
    """One process, DeepSpeed ZeRO or FSDP2, as the flags say (the process group starts here)."""
    tc = p.config
    dtype = TORCH_DTYPES[tc.dtype]
    if tc.strategy == "single":
        return SingleProcess(_device(tc), dtype)
    device = _device(tc) if tc.backend == "cpu" else local_device(tc.backend)
    if tc.strategy == "fsdp":
        from .strategy_fsdp import FSDPStrategy

        return FSDPStrategy(device, dtype)
    from .strategy_deepspeed import DeepSpeedStrategy

    return DeepSpeedStrategy(device, p.deepspeed, p.echo)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device(tc: TrainConfig) -> torch.device:
    if tc.backend == "cuda" and not torch.cuda.is_available():
        raise ParrotError("--backend cuda: no CUDA GPU is available on this machine; use --backend cpu")
    return torch.device(tc.backend)


def _save_checkpoint(p: PreparedRun, strategy: Strategy, step: int, plan: StepPlan, run_config: dict) -> None:
    run, keep = p.run, p.config.save_total_limit
    tmp = run.staging_dir(step) if strategy.rank == 0 else run.checkpoints / f".tmp-step-{step:08d}"
    strategy.barrier()
    strategy.save(tmp)
    save_rng(tmp / f"rng-rank{strategy.rank}.safetensors")
    strategy.barrier()
    if strategy.rank == 0:
        write_json(tmp / "run_config.json", run_config)
        write_model_description(p.source, tmp / MODEL_DIR, p.config.dtype, p.config.max_length)
        epoch, offset = plan.position(step)
        state = {"step": step, "epoch": epoch, "sample_offset": offset, "total_steps": plan.total_steps,
                 "strategy": strategy.name, "world_size": strategy.world_size, "host_rng": host_rng_state()}
        run.commit(tmp, step, state, keep)
    strategy.barrier()
