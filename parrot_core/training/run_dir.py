"""A training run's output directory, shared by every backend's trainer.

```
OUTPUT/
  .parrot-output.json      marks a parrot train run directory (what --resume continues)
  run_config.json          the resolved run config (flags + defaults + derived numbers)
  data_report.json         what the data check kept and dropped, and why
  metrics.jsonl            one JSON object per optimizer step
  checkpoints/step-00000100/   trainable tensors, optimizer, trainer_state.json, run_config.json,
                               model/ (the model description: config, tokenizer, preprocessor)
  config.json, model.safetensors, tokenizer, preprocessor_config.json    the final consolidated model
```
A checkpoint is written into a temporary directory and renamed into place; `trainer_state.json`
is written last, so a directory without it is never taken as a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ParrotError
from ..model.schema import parse_json
from ..storage.fsutil import OUTPUT_MARKER, atomic_output_file, is_output_of, mark_output

STATE_NAME = "trainer_state.json"
MODEL_DIR = "model"  # a checkpoint's model description (config, tokenizer, preprocessor settings)
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class RunDir:
    def __init__(self, output: str | Path):
        self.root = Path(output)
        self.checkpoints = self.root / "checkpoints"
        self.metrics = self.root / "metrics.jsonl"
        self.run_config = self.root / "run_config.json"
        self.data_report = self.root / "data_report.json"

    def check(self, resume: bool) -> None:
        """Refuses a non-empty output directory unless resuming a run in it; `--resume` refuses a non-empty
        directory that is not a run directory (its files are the user's, not the run's)."""
        if self.root.exists() and not self.root.is_dir():
            raise ParrotError(f"--output {self.root}: exists and is not a directory")
        if not self.root.is_dir() or not any(self.root.iterdir()):
            return
        if not resume:
            raise ParrotError(
                f"--output {self.root}: already exists and is not empty. Pass --resume to continue the run in "
                "it, or choose another --output."
            )
        if not self.is_run_dir():
            raise ParrotError(
                f"--output {self.root}: --resume continues a run, but this non-empty directory is not a parrot train "
                f"run directory (no {OUTPUT_MARKER}, run_config.json or checkpoints/ from parrot train). Choose "
                "another --output (an empty or new directory starts a run)."
            )

    def is_run_dir(self) -> bool:
        """A directory `parrot train` made: its marker, its run_config.json, or checkpoints/ with data_report.json
        (a run killed before its first step)."""
        return (is_output_of(self.root, "train") or self.run_config.is_file()
                or (self.checkpoints.is_dir() and self.data_report.is_file()))

    def create(self) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        if not is_output_of(self.root, "train"):
            mark_output(self.root, "train")

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_steps(self) -> list[int]:
        if not self.checkpoints.is_dir():
            return []
        steps = []
        for p in self.checkpoints.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / STATE_NAME).is_file():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}"

    def latest_checkpoint(self) -> Path | None:
        steps = self.checkpoint_steps()
        return self.checkpoint_dir(steps[-1]) if steps else None

    def staging_dir(self, step: int) -> Path:
        """An empty temporary directory for checkpoint `step` (left-overs of a killed save are removed)."""
        tmp = self.checkpoints / f".tmp-step-{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, step: int, state: dict[str, Any], keep: int | None = None,
               protect: int | None = None) -> Path:
        """Writes trainer_state.json last, renames `tmp` into place, and prunes old checkpoints (all but the
        `keep` newest and the `protect` step: --save-best's)."""
        write_json(tmp / STATE_NAME, state)
        dst = self.checkpoint_dir(step)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
        if keep is not None:
            for old in [s for s in self.checkpoint_steps()[:-keep] if s != protect]:
                shutil.rmtree(self.checkpoint_dir(old), ignore_errors=True)
        return dst

    # ---------------------------------------------------------------- metrics
    def truncate_metrics(self, step: int) -> None:
        """Keeps the rows of steps <= `step` (a killed run may have logged steps it never saved)."""
        if not self.metrics.is_file():
            return
        rows = [line for line in self.metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = []
        for line in rows:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                break  # a torn last line
        with atomic_output_file(self.metrics) as f:
            f.write("".join(r + "\n" for r in kept))

    def log_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    p = p / "metrics.jsonl" if p.is_dir() else p
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_json(path: Path, obj: Any) -> None:
    with atomic_output_file(path) as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ParrotError(f"{path}: not found (incomplete checkpoint?)") from None
    return parse_json(raw, str(path))


# ---------------------------------------------------------------- host RNG states (JSON)
def host_rng_state() -> dict[str, Any]:
    """Python's and numpy's global RNG states as JSON-able values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_host_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
