"""`--report-to tensorboard|wandb`: the metrics rows of a run, also sent to a logger (rank 0).

metrics.jsonl stays the source of truth (written first, every row); a logger gets the same numbers:
TensorBoard event files in OUTPUT/runs (scalars `train/loss`, `train/lr`, `train/grad_norm`,
`train/tokens_per_s`, ..., and `eval/<dataset>/accuracy`), written with tensorboard's own event writer
(no torch or TensorFlow needed); Weights & Biases through `wandb` (its files in OUTPUT/wandb;
`WANDB_MODE=offline` logs without a network, `WANDB_PROJECT` names the project, default "parrot").
Both are optional extras: `pip install 'parrot-vlm[tensorboard]'` / `'parrot-vlm[wandb]'`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

from .. import registry
from ..errors import ParrotError

EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}  # kind: (module, extra)
SKIP = ("step", "epoch")  # row fields that are no scalar series


class Reporter(Protocol):
    def log(self, row: dict[str, Any]) -> None:
        """One metrics row ({"step": N, "loss": ..., ...} or {"step": N, "eval/...": ...})."""

    def close(self) -> None: ...


def check_reporter(kind: str) -> None:
    """Fails early, before the run starts, when the logger's package is missing."""
    if kind in EXTRAS:
        module, extra = EXTRAS[kind]
        if err := registry.import_problem(module):
            raise ParrotError(f"--report-to {kind} needs {module} ({err}): pip install 'parrot-vlm[{extra}]'")


def open_reporter(kind: str, root: Path, run_config: dict[str, Any]) -> Reporter | None:
    if kind == "tensorboard":
        return TensorBoardReporter(Path(root) / "runs")
    if kind == "wandb":
        return WandbReporter(Path(root), run_config)
    return None


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in row.items():
        if k in SKIP or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        out[k if "/" in k else f"train/{k}"] = float(v)
    return out


class TensorBoardReporter:
    def __init__(self, directory: Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        directory.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(directory))

    def log(self, row: dict[str, Any]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=v) for k, v in _scalars(row).items()]
        self.writer.add_event(Event(wall_time=time.time(), step=int(row["step"]), summary=Summary(value=values)))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    def __init__(self, root: Path, run_config: dict[str, Any]):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "parrot"), dir=str(root),
                              name=root.name, config=run_config, reinit="finish_previous")

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(_scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()
