"""`parrot eval` from Python: answer datasets with a model (or read prediction files), score them
as VLMEvalKit does, and write the outputs.

    from parrot.eval import evaluate, resolve_sources
    summary = evaluate(resolve_sources(["MMMB_en"]), "out/", model=parrot.load("Parrot-7B", backend="cuda"))
    summary = evaluate(resolve_sources(["MMMB_en"]), "out/", predictions=["Parrot_MMMB_en.xlsx"])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ParrotError
from ..storage.fsutil import check_output
from .data import EvalDataset, index_key, read_dataset
from .predictions import SUFFIXES, AnswerFile, cell, output_columns, read_predictions, scored_rows, split_collection
from .report import (
    dataset_summary,
    read_summary,
    write_acc_csv,
    write_plot,
    write_result_tsv,
    write_summary,
)
from .run import answer_dataset, answer_path, merge_answers
from .scoring import Judge, score_rows
from .sources import COLLECTIONS, DataSource


@dataclass
class EvalSettings:
    batch_size: int = 1
    limit: int | None = None  # the first N questions of each dataset (with their rotations when circular)
    max_tokens: int = 512
    progress: bool = True


def match_predictions(datasets: Sequence[EvalDataset], files: Sequence[Path]) -> dict[str, tuple[Path, Any]]:
    """Predictions file (and frame) for each dataset: the only file for the only dataset, else by name
    (`<name>.*`, VLMEvalKit's `<model>_<name>.xlsx`, or a collection file `<model>_MMMB.xlsx`)."""
    names = [d.name for d in datasets]
    explicit = [f for f in files if not f.is_dir()]
    found: list[Path] = list(explicit)
    for d in files:
        if d.is_dir():
            found += sorted(p for p in d.iterdir() if p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
        elif not d.exists():
            raise ParrotError(f"{d}: predictions file not found")
    if len(names) == 1 and len(explicit) == 1 and len(files) == 1:
        df = read_predictions(explicit[0])
        if "sub_dataset" in df.columns:
            parts = {n.lower(): part for n, part in split_collection(df).items()}
            if names[0].lower() not in parts:
                raise ParrotError(f"{explicit[0]}: a collection file without predictions for {names[0]}")
            df = parts[names[0].lower()]
        return {names[0]: (explicit[0], df)}
    out: dict[str, list[tuple[int, Path, Any]]] = {n: [] for n in names}
    for f in found:
        stem = f.stem.lower()  # names match in any case: mmmb_en.tsv is MMMB_en
        own = [n for n in names if stem == n.lower() or stem.endswith("_" + n.lower())]
        collection = any(stem == c.lower() or stem.endswith("_" + c.lower()) for c in COLLECTIONS)
        if not own and not collection:
            if f in explicit:
                raise ParrotError(f"{f}: its name matches none of the datasets ({', '.join(names)}); name it "
                                  "<dataset>.tsv or <model>_<dataset>.xlsx, or score one dataset at a time")
            continue
        df = read_predictions(f)
        if "sub_dataset" in df.columns:
            by_lower = {n.lower(): n for n in names}
            for n, part in split_collection(df).items():
                if n.lower() in by_lower:
                    out[by_lower[n.lower()]].append((1, f, part))
        for n in own:
            out[n].append((0, f, df))
    result = {}
    for n, cands in out.items():
        if not cands:
            raise ParrotError(f"no predictions file for {n} among {', '.join(map(str, files))}")
        best = [c for c in cands if c[0] == min(x[0] for x in cands)]
        if len(best) > 1:
            raise ParrotError(f"several predictions files for {n}: {', '.join(str(c[1]) for c in best)}")
        result[n] = (best[0][1], best[0][2])
    return result


def evaluate(
    sources: Sequence[DataSource],
    out_dir: str | Path,
    model=None,
    predictions: Sequence[str | Path] | None = None,
    judge: Judge | None = None,
    settings: EvalSettings | None = None,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    echo: Callable[[str], None] = print,
    meta: dict[str, Any] | None = None,
    load_model: Callable[[], Any] | None = None,
    model_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Answers (with `model`) or reads (`predictions`) every dataset, scores it, writes the outputs;
    returns summary.json's content (on ranks other than 0: {}). See the `parrot eval` README section.

    load_model: instead of `model`, called once the data and the output folder are checked (so bad
    input fails before a large model loads). model_dir: the model's folder, which the output must not be in."""
    settings = settings or EvalSettings()
    out_dir = Path(out_dir)
    if (model is None and load_model is None) == (predictions is None):
        raise ParrotError("give a model to answer the questions, or prediction files to score (not both)")
    pred_files = [Path(p).expanduser() for p in predictions or []]
    if out_dir.exists() and not out_dir.is_dir():
        raise ParrotError(f"--output {out_dir}: exists and is not a directory")
    inputs = [("DATA", s.path) for s in sources] + [("--predictions", p) for p in pred_files]
    if model_dir is not None and Path(model_dir).is_dir():
        inputs.append(("--model", Path(model_dir)))
    check_output(out_dir, inputs, name="--output")
    datasets = [read_dataset(s, need_images=predictions is None) for s in sources]
    summary = read_summary(out_dir) if out_dir.exists() else {"datasets": {}}
    scored_files: dict[str, tuple[Path, list, list]] = {}
    if predictions is not None:
        for name, (path, df) in match_predictions(datasets, pred_files).items():
            ds = next(d for d in datasets if d.name == name)
            rows = scored_rows(ds, df, path)
            scored_files[name] = (path, rows, _answer_records(ds, rows, out_dir))
    if model is None and load_model is not None:
        model = load_model()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    if barrier is not None:
        barrier()
    for ds in datasets:
        extra: dict[str, Any] = {"data": str(ds.path)}
        if ds.skipped_no_image and rank == 0:
            echo(f"{ds.name}: {ds.skipped_no_image} rows without an image are skipped, as VLMEvalKit does")
        if model is not None:
            run = answer_dataset(model, ds, out_dir, settings.batch_size, settings.limit, settings.max_tokens,
                                 rank, world, barrier, settings.progress and rank == 0)
            if rank != 0:  # rank 0 reports its own rows at the end; the others here
                for key, err in run.errors.items():
                    echo(f"{ds.name}: index {key} not answered: {err}")
            if barrier is not None:
                barrier()
            if rank != 0:
                continue
            merge_answers(ds, out_dir)
            preds_path = answer_path(out_dir, ds.name)
            preds = read_predictions(preds_path)
            answered = {index_key(v) for v in preds["index"]}
            unanswered = [ds.keys[p] for p in run.selected if ds.keys[p] not in answered]
            rows = scored_rows(ds, preds, preds_path, selected=run.selected)
            extra.update(predictions=str(preds_path), answered_before=run.answered_before,
                         answered_now=run.answered, unanswered=unanswered, errors=run.errors,
                         questions_per_s=round(run.questions_per_s, 3))
        else:
            path, rows, records = scored_files[ds.name]
            if records is not None:
                AnswerFile(answer_path(out_dir, ds.name), output_columns(ds)).rewrite(records)
            extra.update(predictions=str(path))
            if len(rows) < len(ds):
                echo(f"{ds.name}: {path} holds predictions for {len(rows)} of {len(ds)} rows; scoring those")
        if ds.problems:
            extra["data_problems"] = ds.problems
        scored = score_rows(rows, ds.circular, judge)
        write_acc_csv(scored, out_dir / f"{ds.name}_acc.csv")
        write_result_tsv(scored, out_dir / f"{ds.name}_result.tsv")
        summary["datasets"][ds.name] = dataset_summary(scored, **extra)
    if rank != 0:
        return {}
    summary.update({k: v for k, v in (meta or {}).items()})
    write_summary(out_dir, summary)
    if not write_plot(out_dir, summary):
        echo("summary.png not drawn: matplotlib is not installed (pip install 'parrot-vlm[plot]')")
    return summary


def problems_report(summary: dict[str, Any], names: Sequence[str]) -> list[str]:
    """Lines about rows that were not answered or whose data is wrong, for the end of a run."""
    lines = []
    for name in names:
        entry = summary["datasets"].get(name, {})
        unanswered, errors = entry.get("unanswered") or [], entry.get("errors") or {}
        if unanswered:
            shown = "; ".join(f"index {k}: {errors[k]}" for k in unanswered[:5] if k in errors)
            lines.append(f"{name}: {len(unanswered)} rows could not be answered and count as wrong"
                         f"{f' ({shown})' if shown else ''}; run the same command again to retry them")
        problems = entry.get("data_problems") or {}
        if problems:
            shown = "; ".join(f"index {k}: {v}" for k, v in list(problems.items())[:5])
            lines.append(f"{name}: {len(problems)} rows of DATA are faulty and count as wrong, as in VLMEvalKit "
                         f"({shown}{'; ...' if len(problems) > 5 else ''})")
    return lines


def _answer_records(ds: EvalDataset, rows, out_dir: Path) -> list[list[str]] | None:
    """The `<dataset>.tsv` records of scored prediction files (None: that file is already there, the
    same); different answers already in `out_dir` are never replaced."""
    cols = output_columns(ds)
    records = []
    for r in sorted(rows, key=lambda r: ds.position[r.key]):
        data = ds.rows[ds.position[r.key]]
        records.append([cell(data[c]) for c in cols[:-1]] + ["" if r.prediction == "nan" else r.prediction])
    path = answer_path(out_dir, ds.name)
    if not path.exists():
        return records
    try:
        same = list(AnswerFile(path, cols).read(repair=False).values()) == records
    except ParrotError:
        same = False
    if not same:
        raise ParrotError(f"{path}: holds other answers (an earlier run's?); score into another --output")
    return None
