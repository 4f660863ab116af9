"""The training run, once for every backend: resume, the run config, the step loop with its metrics
row and progress bar, the save cadence, and the export at the end.

A backend's trainer builds its model and optimizer, then hands an `Engine` to `run_steps`; the
engine knows how to run one optimizer step on a global batch's micro-batches and how to save, load
and export its state. What one step does (nanoGPT order): count the global batch's label tokens ->
for each micro-batch: forward -> summed loss / that count -> backward -> clip + optimizer step at the
scheduled lr. See docs/architecture.md, "Training".
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from .evaluation import MEAN, eval_due, eval_sources, run_eval
from .prepare import PreparedRun
from .report import open_reporter
from .run_dir import MODEL_DIR, STATE_NAME, host_rng_state, read_json, set_host_rng_state, write_json
from .schedule import StepPlan
from .source import write_model_description


@dataclass
class StepStats:
    """One optimizer step, summed over every micro-batch and process."""

    loss_sum: float  # summed token loss (divide by label_count for the mean)
    label_count: int  # label tokens of the global batch
    grad_norm: float  # before clipping
    lr: float  # the learning rate the step used
    tokens: int  # valid (spliced) positions
    padded: int  # positions computed, padding included
    peak_memory_gib: float | None = None  # where the device measures it


class Engine(Protocol):
    """What `run_steps` needs from a backend's trainer (one process of the run)."""

    rank: int
    world_size: int

    def describe(self) -> tuple[str, str]:
        """(how the global batch is split, e.g. " x 2 process(es), FSDP2"; what runs, e.g. "float32 on cpu")."""

    def run_config_extra(self) -> dict[str, Any]:
        """Entries added to the run config's "derived" part (versions, device, sharding)."""

    def state_extra(self) -> dict[str, Any]:
        """Entries added to trainer_state.json."""

    def load(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """Restores weights, optimizer, schedule and device RNG from a checkpoint of this run."""

    def batches(self, plan: StepPlan, start: int) -> Iterator[list[dict[str, Any]]]:
        """The collated micro-batches of each step from `start` on (this process's share)."""

    def step(self, step: int, micro: list[dict[str, Any]]) -> StepStats:
        """One optimizer step on the micro-batches."""

    def save(self, directory: Path) -> None:
        """Trainable weights, optimizer, schedule and RNG into `directory` (every process calls it)."""

    def export(self, out: Path) -> str:
        """Writes the final model (or adapter) into `out`; returns the sentence that says where it is."""

    def barrier(self) -> None: ...

    def close(self) -> None:
        """Ends the process group, if any."""

    def eval_model(self) -> AbstractContextManager:
        """The current weights as a `parrot.api.ParrotModel` in eval mode (rank 0), for --eval-data."""


def resume_step(p: PreparedRun, engine: Engine) -> int:
    """Restores the latest checkpoint when resuming; the step to start from."""
    if p.resume_from is None:
        return 0
    state = read_json(p.resume_from / STATE_NAME)
    engine.load(p.resume_from, state)
    set_host_rng_state(state["host_rng"])
    return state["step"]


def run_steps(p: PreparedRun, engine: Engine, plan: StepPlan, warmup_steps: int, stop_after: int | None = None,
              progress: bool = True) -> Path:
    """Trains from the latest checkpoint (or step 0) to the end of `plan`, then exports; returns the output
    directory. stop_after: stop after that many steps in total, without exporting (like a preempted job)."""
    tc, run, echo = p.config, p.run, p.echo
    start = resume_step(p, engine)
    if start:
        echo(f"resumed from {p.resume_from} (step {start} of {plan.total_steps})")
    run_config = p.run_config(plan, warmup_steps, **engine.run_config_extra())
    if engine.rank == 0:
        run.truncate_metrics(start)
        write_json(run.run_config, run_config)
    split, what = engine.describe()
    echo(f"{plan.total_steps} steps of {plan.global_batch} samples ({tc.batch_size} x {tc.grad_accum} accumulation"
         f"{split}), lr {tc.lr:g}, {what}")

    reporter = open_reporter(tc.report_to, run.root, run_config) if engine.rank == 0 else None
    sources = eval_sources(tc) if tc.eval_data else []
    best = read_json(p.resume_from / STATE_NAME).get("best") if start and tc.save_best else None
    batches = engine.batches(plan, start)
    bar = tqdm(total=plan.total_steps, initial=start, desc=f"stage {tc.stage}", unit="step",
               disable=not progress or engine.rank != 0, dynamic_ncols=True)
    peak = 0.0
    try:
        for step in range(start, plan.total_steps):
            if stop_after is not None and step >= stop_after:
                break
            t0 = time.perf_counter()
            s = engine.step(step, next(batches))
            dt = time.perf_counter() - t0
            loss = s.loss_sum / s.label_count
            row = {"step": step + 1, "loss": loss, "lr": s.lr, "grad_norm": s.grad_norm,
                   "tokens_per_s": s.tokens / dt, "padding_fraction": 1 - s.tokens / s.padded,
                   "num_tokens": int(s.tokens), "num_label_tokens": int(s.label_count),
                   "epoch": plan.position(step)[0]}
            postfix = {"loss": f"{loss:.4f}", "lr": f"{s.lr:.2e}", "tok_s": f"{s.tokens / dt:,.0f}"}
            if s.peak_memory_gib is not None:
                row["peak_memory_gib"] = s.peak_memory_gib
                postfix["mem"] = f"{s.peak_memory_gib:.2f}G"
                peak = max(peak, s.peak_memory_gib)
            evaluated = eval_due(tc, step + 1, plan.total_steps)
            if evaluated and engine.rank == 0:
                with engine.eval_model() as model:
                    row.update(run_eval(model, sources, run.root / "eval" / f"step-{step + 1:08d}", tc.eval_limit,
                                        bar.write))
                if row[MEAN] is not None:
                    postfix["eval"] = f"{row[MEAN]:.3f}"
                    if tc.save_best and (best is None or row[MEAN] > best["accuracy"]):
                        best = {"step": step + 1, "accuracy": row[MEAN]}
            if engine.rank == 0:
                run.log_metrics(row)
                if reporter is not None:
                    reporter.log(row)
            bar.set_postfix(postfix)
            bar.update(1)
            if (step + 1) % tc.save_every == 0 or step + 1 == plan.total_steps or (evaluated and tc.save_best):
                save_checkpoint(p, engine, step + 1, plan, run_config, best)
    finally:
        bar.close()
        if reporter is not None:
            reporter.close()
    if peak:
        echo(f"peak memory: {f'{peak:.2f} GiB' if peak >= 1 else f'{peak * 1024:.0f} MiB'}")
    if best is not None:
        echo(f"best eval accuracy {best['accuracy']:.4f} at step {best['step']}: {run.checkpoint_dir(best['step'])}")

    steps = run.checkpoint_steps()
    if stop_after is not None and not (steps and steps[-1] >= plan.total_steps):
        echo(f"stopped after step {min(stop_after, plan.total_steps)}; continue with --resume")
        engine.close()
        return run.root
    message = engine.export(run.root)
    engine.close()
    echo(message)
    return run.root


def save_checkpoint(p: PreparedRun, engine: Engine, step: int, plan: StepPlan, run_config: dict,
                    best: dict | None = None) -> None:
    """checkpoints/step-N: the engine's state, the run config, the model description and, written last,
    trainer_state.json (a directory without it is never taken as a checkpoint)."""
    run = p.run
    tmp = run.staging_dir(step) if engine.rank == 0 else run.checkpoints / f".tmp-step-{step:08d}"
    engine.barrier()
    engine.save(tmp)
    engine.barrier()
    if engine.rank == 0:
        write_json(tmp / "run_config.json", run_config)
        write_model_description(p.source, tmp / MODEL_DIR, p.config.dtype, p.config.max_length)
        epoch, offset = plan.position(step)
        state = {"step": step, "epoch": epoch, "sample_offset": offset, "total_steps": plan.total_steps,
                 "host_rng": host_rng_state(), **engine.state_extra()}
        if best is not None:  # --save-best: the best checkpoint so far is never pruned
            state["best"] = best
        run.commit(tmp, step, state, p.config.save_total_limit, protect=best["step"] if best else None)
    engine.barrier()
