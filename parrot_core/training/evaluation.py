"""`--eval-data TSV --eval-every N [--eval-limit K] [--save-best]`: `parrot eval`'s scorer on the
current weights while training (rank 0).

Every N steps (and after the last) the engine lends its model as a `ParrotModel` in eval mode
(`Engine.eval_model`); the VLMEvalKit datasets are answered and scored exactly as `parrot eval` does
(parrot.eval.evaluate, greedy), into OUTPUT/eval/step-N. The accuracies go into that step's
metrics row (`eval/<dataset>/accuracy` and their mean `eval/accuracy`) and to the logger; with
--save-best the checkpoint of the best mean accuracy is kept beside the newest ones.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..eval.evaluate import EvalSettings, evaluate
from ..eval.sources import DataSource, resolve_sources
from .config import TrainConfig
from .source import ModelSource

MEAN = "eval/accuracy"


def eval_sources(tc: TrainConfig) -> list[DataSource]:
    """The --eval-data files, checked before the run starts (local TSVs or cached dataset names)."""
    return resolve_sources(list(tc.eval_data or []), download=False, progress=False)


def eval_due(tc: TrainConfig, step: int, total_steps: int) -> bool:
    """Whether 1-based `step` ends with an evaluation."""
    return bool(tc.eval_data) and (step % tc.eval_every == 0 or step == total_steps)


def model_checkpoint(src: ModelSource) -> SimpleNamespace:
    """What a `ParrotModel` reads from its checkpoint (path: tokenizer and generation settings; config;
    tower), for a model that lives in a trainer."""
    return SimpleNamespace(path=Path(src.tokenizer_dir), config=src.config, tower=src.tower, quantized=False)


def run_eval(model, sources: list[DataSource], out: Path, limit: int | None, echo) -> dict[str, Any]:
    """Answers and scores every dataset with `model` into `out` (replaced: a resumed run evaluates again);
    returns the metrics entries: `eval/<name>/accuracy` per dataset and their mean."""
    if out.exists():
        shutil.rmtree(out)
    summary = evaluate(sources, out, model=model, settings=EvalSettings(limit=limit, progress=False), echo=echo)
    row: dict[str, Any] = {}
    for name, d in summary["datasets"].items():
        row[f"eval/{name}/accuracy"] = d["overall"]
    accs = [v for v in row.values() if v is not None]
    row[MEAN] = sum(accs) / len(accs) if accs else None
    return row
