"""`parrot.train(config)`: checks everything a run needs without torch or mlx (settings, output
directory, resume compatibility, model source, the data), then hands the prepared run to the
chosen backend's trainer, imported lazily (as `parrot.load` does)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import LlavaData
from .errors import ParrotError
from .run_dir import RunDir, read_json, write_json
from .schedule import StepPlan
from .tokenizer import Tokenizer
from .train_config import TrainConfig
from .train_source import ModelSource, open_source


@dataclass
class PreparedRun:
    config: TrainConfig  # resolved
    run: RunDir
    resume_from: Path | None  # the latest checkpoint, when resuming
    source: ModelSource
    tokenizer: Tokenizer
    data: LlavaData
    rank: int  # this process's rank (torchrun / deepspeed set RANK)

    def echo(self, *args) -> None:
        if self.rank == 0:
            print(*args, flush=True)

    def run_config(self, plan: StepPlan, warmup_steps: int, **extra) -> dict[str, Any]:
        """The resolved run config written next to the checkpoints: the settings and what they imply."""
        return {"config": self.config.to_dict(), "derived": {
            "source": self.source.description, "num_samples": len(self.data), "total_steps": plan.total_steps,
            "steps_per_epoch": plan.steps_per_epoch, "global_batch": plan.global_batch,
            "warmup_steps": warmup_steps, "use_moe": self.config.use_moe, **extra}}


def prepare_run(tc: TrainConfig, progress: bool = True) -> PreparedRun:
    tc = tc.resolved()
    rank = int(os.environ.get("RANK", "0"))
    run = RunDir(tc.output)
    run.check(tc.resume)
    latest = run.latest_checkpoint() if tc.resume else None
    if latest is not None:
        saved = TrainConfig.from_dict(read_json(latest / "run_config.json")["config"])
        diff = tc.trajectory_diff(saved)
        if (saved.backend == "mlx") != (tc.backend == "mlx"):
            diff.append(f"backend {saved.backend!r} -> {tc.backend!r} (MLX and torch checkpoints differ)")
        if diff:
            raise ParrotError(f"--resume: this run's settings differ from the checkpoint's ({'; '.join(diff)}). "
                              "Resume with the same flags, or start a new run in another --output.")
    src = open_source(tc)
    tok = Tokenizer.from_dir(src.tokenizer_dir)
    n_visual = src.config.num_visual_tokens(src.tower.config)
    data = LlavaData(tc.data, tc.image_dir, tok, src.tower.image, n_visual, tc.max_length, tc.truncate,
                     progress=progress and rank == 0)
    prepared = PreparedRun(tc, run, latest, src, tok, data, rank)
    prepared.echo(data.report.summary())
    if tc.resume and latest is None:
        prepared.echo(f"--resume: no checkpoint in {run.checkpoints}; starting from step 0")
    if rank == 0:
        run.create()
        write_json(run.data_report, data.report.to_dict())
    return prepared


def _check_backend(tc: TrainConfig) -> None:
    if tc.backend == "mlx":
        return _check_mlx(tc)
    if tc.deepspeed is not None or tc.fsdp:
        raise ParrotError("--deepspeed / --fsdp are not supported yet; train in one process without them")
    if importlib.util.find_spec("torch") is None:
        raise ParrotError(f"--backend {tc.backend} needs PyTorch, which is not installed: "
                          "pip install 'parrot-vlm[torch]'")
    if tc.backend == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ParrotError("--backend cuda: no CUDA GPU is available on this machine; use --backend cpu")


def _check_mlx(tc: TrainConfig) -> None:
    if tc.deepspeed is not None or tc.fsdp:
        raise ParrotError("--deepspeed / --fsdp shard torch training; --backend mlx trains in one process")
    from .api import _import_error

    if err := _import_error("mlx.core", "mlx_lm"):
        raise ParrotError(f"--backend mlx needs MLX, which is not installed or fails to import ({err}): "
                          "pip install 'parrot-vlm[mlx]'")


def train(tc: TrainConfig, stop_after: int | None = None, progress: bool = True) -> Path:
    """Runs (or, with `resume`, continues) a training run; returns the output directory, which then
    holds the final consolidated model (the next stage's `--model`).

    stop_after: stop after that many optimizer steps in total, without exporting (like a preempted job).
    """
    _check_backend(tc)
    prepared = prepare_run(tc, progress)
    if tc.backend == "mlx":
        from .backends.mlx.train.loop import run_training
    else:
        from .backends.torch_cuda.train.loop import run_training

    return run_training(prepared, stop_after=stop_after, progress=progress)
