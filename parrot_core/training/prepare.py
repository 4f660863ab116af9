"""`parrot.train(config)`: checks everything a run needs without torch or mlx (settings, output
directory, resume compatibility, model source, the data), then hands the prepared run to the
chosen backend's trainer, imported lazily (as `parrot.load` does)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import registry
from ..errors import ParrotError
from ..model.schema import RUN_CONFIG, check
from ..model.tokenizer import Tokenizer
from ..registry import BackendSpec
from ..storage.fsutil import check_output
from .config import TrainConfig
from .data import LlavaData
from .ds_config import ResolvedDeepSpeed, read_ds_config, resolve_ds_config
from .report import check_reporter
from .run_dir import RunDir, read_json, write_json
from .schedule import StepPlan, warmup_steps
from .source import ModelSource, open_source


@dataclass
class PreparedRun:
    config: TrainConfig  # resolved
    run: RunDir
    resume_from: Path | None  # the latest checkpoint, when resuming
    source: ModelSource
    tokenizer: Tokenizer
    data: LlavaData
    rank: int  # this process's rank (torchrun / deepspeed set RANK)
    world_size: int = 1
    deepspeed: ResolvedDeepSpeed | None = None  # the --deepspeed JSON, "auto" fields resolved from the flags

    def echo(self, *args) -> None:
        if self.rank == 0:
            print(*args, flush=True)

    def run_config(self, plan: StepPlan, warmup_steps: int, **extra) -> dict[str, Any]:
        """The resolved run config written next to the checkpoints: the settings and what they imply."""
        return {"config": self.config.to_dict(), "derived": {
            "source": self.source.description, "num_samples": len(self.data), "total_steps": plan.total_steps,
            "steps_per_epoch": plan.steps_per_epoch, "global_batch": plan.global_batch,
            "warmup_steps": warmup_steps, "use_moe": self.config.use_moe, "world_size": self.world_size,
            "strategy": self.config.strategy, **extra}}


def launch_world() -> tuple[int, int]:
    """(rank, world size) as torchrun / the deepspeed launcher set them; (0, 1) when not launched."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ParrotError("RANK / WORLD_SIZE are set but not integers; launch with torchrun or deepspeed") from None


def _check_resume(tc: TrainConfig, latest: Path, world_size: int) -> None:
    path = latest / "run_config.json"
    saved_run = read_json(path)
    check(saved_run, RUN_CONFIG, str(path))
    saved = TrainConfig.from_dict(saved_run["config"], str(path))
    diff = tc.trajectory_diff(saved)
    saved_world = saved_run.get("derived", {}).get("world_size", 1)
    if saved.grad_accum * saved_world != tc.grad_accum * world_size:
        diff.append(f"global batch: --grad-accum {saved.grad_accum} x {saved_world} process(es) -> "
                    f"{tc.grad_accum} x {world_size}")
    if saved.strategy != tc.strategy:
        diff.append(f"sharding {saved.strategy} -> {tc.strategy} (the checkpoint's format is {saved.strategy}'s)")
    if registry.get(saved.backend).family != registry.get(tc.backend).family:
        diff.append(f"backend {saved.backend!r} -> {tc.backend!r} (their training checkpoints differ)")
    if diff:
        raise ParrotError(f"--resume: this run's settings differ from the checkpoint's ({'; '.join(diff)}). "
                          "Resume with the same flags (--grad-accum may change with the number of processes if "
                          "the global batch stays the same), or start a new run in another --output.")


def _check_output(tc: TrainConfig) -> None:
    """--output is no input, lies inside none and contains none (it may lie inside the image folder)."""
    inputs = [("--model", tc.model), ("--llm", tc.llm), ("--vision-tower", tc.vision_tower), ("--data", tc.data),
              ("--deepspeed", tc.deepspeed)]
    check_output(tc.output, inputs, "--output", folders=[("--image-dir", tc.image_dir)])


def prepare_run(tc: TrainConfig, progress: bool = True) -> PreparedRun:
    tc = tc.resolved()
    rank, world_size = launch_world()
    if world_size > 1 and tc.strategy == "single":
        raise ParrotError(f"launched with {world_size} processes but neither --deepspeed nor --fsdp: pass one of "
                          "them (e.g. --deepspeed zero3 or --fsdp), or run one process")
    _check_output(tc)
    check_reporter(tc.report_to)
    if tc.quantize and (err := registry.import_problem("bitsandbytes")):
        raise ParrotError(f"--quantize 4 needs bitsandbytes ({err}): pip install 'parrot-vlm[qlora]'")
    if tc.eval_data:
        from .evaluation import eval_sources

        eval_sources(tc)  # a missing --eval-data file fails before the run starts
    raw_ds = read_ds_config(tc.deepspeed) if tc.deepspeed is not None else None
    run = RunDir(tc.output)
    if rank == 0:  # the other ranks may look only after rank 0 created the directory
        run.check(tc.resume)
    latest = run.latest_checkpoint() if tc.resume else None
    if latest is not None:
        _check_resume(tc, latest, world_size)
    src = open_source(tc)
    check_output(tc.output, [("model", src.tokenizer_dir), ("vision tower", src.tower.directory)], "--output")
    tok = Tokenizer.from_dir(src.tokenizer_dir)
    n_visual = src.config.num_visual_tokens(src.tower.config)
    data = LlavaData(tc.data, tc.image_dir, tok, src.tower.image, n_visual, tc.max_length, tc.truncate,
                     progress=progress and rank == 0)
    ds = None
    if raw_ds is not None:
        plan = StepPlan.for_run(tc, data, world_size)
        ds = resolve_ds_config(
            raw_ds, batch_size=tc.batch_size, grad_accum=tc.grad_accum, world_size=world_size, lr=tc.lr,
            weight_decay=tc.weight_decay, max_grad_norm=tc.max_grad_norm, dtype=tc.dtype,
            hidden_size=src.config.hidden_size, total_steps=plan.total_steps,
            warmup_steps=warmup_steps(plan.total_steps, tc.warmup_ratio), source=f"--deepspeed {tc.deepspeed}")
        if not registry.get(tc.backend).half_precision_training and ds.config.get("fp16", {}).get("enabled") is True:
            raise ParrotError(f"--deepspeed: fp16 needs CUDA; on --backend {tc.backend} train in float32")
    prepared = PreparedRun(tc, run, latest, src, tok, data, rank, world_size, ds)
    prepared.echo(data.report.summary())
    if tc.resume and latest is None:
        prepared.echo(f"--resume: no checkpoint in {run.checkpoints}; starting from step 0")
    if rank == 0:
        run.create()
        write_json(run.data_report, data.report.to_dict())
    return prepared


def _check_backend(tc: TrainConfig) -> BackendSpec:
    spec = registry.require(tc.backend)
    if tc.deepspeed is not None and registry.import_problem("deepspeed"):
        raise ParrotError("--deepspeed needs DeepSpeed, which is not installed: pip install 'parrot-vlm[deepspeed]'")
    return spec


def train(tc: TrainConfig, stop_after: int | None = None, progress: bool = True) -> Path:
    """Runs (or, with `resume`, continues) a training run; returns the output directory, which then
    holds the final consolidated model (the next stage's `--model`).

    stop_after: stop after that many optimizer steps in total, without exporting (like a preempted job).
    """
    if tc.backend is None:
        tc = replace(tc, backend=registry.default_backend())
    spec = _check_backend(tc)
    prepared = prepare_run(tc, progress)
    return spec.load("trainer")(prepared, stop_after=stop_after, progress=progress)
