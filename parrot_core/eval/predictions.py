"""Prediction files: the resumable `<dataset>.tsv` a run writes, and the files `--predictions` scores.

`<dataset>.tsv` holds every DATA column but `image`, plus `prediction`, in VLMEvalKit's TSV style
(tab-separated, every field quoted, pandas reads it back). A run appends one record per answer and
flushes it; a rerun reads the records that are complete (a record torn by a kill is dropped) and
answers only the rest. Under torchrun each rank appends to its own `.<dataset>.rank<R>.tsv`, and
rank 0 merges them into `<dataset>.tsv` (in DATA order) at the end.

`--predictions` reads TSV, CSV, XLSX (VLMEvalKit's `<model>_<dataset>.xlsx`, or its collection
file `<model>_MMMB.xlsx` split by `SUB_DATASET` / `original_index`) or JSONL (`index`/`id` with
`prediction`/`text`, as `parrot generate` writes); column names are lowercased except option
letters, as VLMEvalKit's evaluate does.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import ParrotError
from ..storage.fsutil import atomic_output_file
from .data import EvalDataset, index_key, read_table
from .prompt import OPTION_LETTERS, is_missing
from .scoring import ScoredRow

SUFFIXES = (".tsv", ".csv", ".xlsx", ".jsonl")
PREDICTION = "prediction"


def cell(value: Any) -> str:
    """A value as pandas' to_csv writes it (empty for NaN)."""
    return "" if is_missing(value) else str(value)


def _same_text(a: Any, b: Any) -> bool:
    return " ".join(cell(a).split()) == " ".join(cell(b).split())


# ------------------------------------------------------------------ the resumable answer file
class AnswerFile:
    """One process's `<dataset>.tsv` (or rank part), appended record by record."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns

    def read(self, repair: bool) -> dict[str, list[str]]:
        """Complete records by index key. A torn last record is dropped (and, with `repair`, removed
        from the file atomically). A file with other columns is refused: it is not this dataset's."""
        if not self.path.exists():
            return {}
        if not self.path.is_file():
            raise ParrotError(f"{self.path}: exists and is not a file")
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        records: list[list[str]] = []
        torn = "\n" not in text and text != ""  # not even a complete header
        if not torn:
            try:
                records.extend(csv.reader(io.StringIO(text, newline=""), delimiter="\t", strict=True))
            except csv.Error:
                torn = True  # a record cut inside a quoted field; the ones before it are complete
            else:
                if text and not text.endswith("\n"):
                    torn = True  # the last record lacks its newline
                    records.pop()
        if records and records[0] != self.columns:
            raise ParrotError(f"{self.path}: exists with other columns than this dataset's answers; it is not a "
                              "prediction file of this DATA. Choose another --output (or move the file away)")
        complete = [r for r in records[1:] if len(r) == len(self.columns)]
        if repair and (torn or len(complete) != len(records[1:])):
            self.rewrite(complete)
        key_at = self.columns.index("index")
        return {index_key(r[key_at]): r for r in complete}

    def rewrite(self, records: list[list[str]]) -> None:
        with atomic_output_file(self.path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")
            w.writerow(self.columns)
            w.writerows(records)

    def append(self, records: list[list[str]]) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a", encoding="utf-8", newline="")
        except OSError as e:
            raise ParrotError(f"{self.path}: cannot write the answers ({e.strerror})") from None
        with f:
            w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")
            if new:
                w.writerow(self.columns)
            for rec in records:
                f.write(_line(rec))
            f.flush()
            os.fsync(f.fileno())


def _line(record: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n").writerow(record)
    return buf.getvalue()  # one write per record: a kill tears at most the last one


def output_columns(ds: EvalDataset) -> list[str]:
    return [c for c in ds.columns if c != PREDICTION] + [PREDICTION]


def check_answers(ds: EvalDataset, answers: dict[str, list[str]], path: Path) -> None:
    """Refuses answers to other questions under the same index (a stale output of another DATA)."""
    cols = output_columns(ds)
    q_at = cols.index("question")
    for key, rec in answers.items():
        pos = ds.position.get(key)
        if pos is None or not _same_text(rec[q_at], ds.rows[pos]["question"]):
            what = "is not in DATA" if pos is None else "holds another question than DATA's"
            raise ParrotError(f"{path}: index {key} {what}; these answers belong to another dataset. Choose another "
                              "--output (or move the file away)")


# ------------------------------------------------------------------ reading predictions
def _normalize_columns(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    df = df.rename(columns={c: (str(c) if str(c) in OPTION_LETTERS else str(c).lower()) for c in df.columns})
    if df.columns.duplicated().any():
        raise ParrotError(f"{path}: repeated column names (after lowercasing, as VLMEvalKit does)")
    for col in ("index", PREDICTION):
        if col not in df.columns:
            raise ParrotError(f"{path}: no {col!r} column; a predictions file needs index and prediction")
    return df


def read_predictions(path: Path) -> pd.DataFrame:
    """A predictions file as a DataFrame with at least `index` and `prediction`."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ParrotError(f"{path}: unsupported predictions file (expected {', '.join(SUFFIXES)})")
    if not path.is_file():
        raise ParrotError(f"{path}: predictions file not found" if not path.exists() else f"{path}: not a file")
    if suffix == ".jsonl":
        return _normalize_columns(_read_jsonl(path), path)
    if suffix == ".xlsx":
        try:
            df = pd.read_excel(path)
        except ImportError:
            raise ParrotError("reading .xlsx needs openpyxl: pip install 'parrot-vlm[eval]'") from None
        except Exception as e:  # zipfile / openpyxl errors of every kind for a corrupt file
            raise ParrotError(f"{path}: not a readable XLSX file ({type(e).__name__}: {e})") from None
    else:
        # predictions stay text ("3" stays "3"), as in VLMEvalKit's XLSX round trip
        df = read_table(path, "predictions", text_columns=(PREDICTION, "Prediction", "PREDICTION"))
    return _normalize_columns(df, path)


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise ParrotError(f"{path}: line {n} is not valid JSON") from None
        if not isinstance(obj, dict):
            raise ParrotError(f"{path}: line {n} is not a JSON object")
        if "error" in obj and "text" not in obj and PREDICTION not in obj:
            continue  # a `parrot generate` error row: no prediction
        index = obj.get("index", obj.get("id"))
        pred = obj.get(PREDICTION, obj.get("text"))
        if index is None:
            raise ParrotError(f"{path}: line {n} has no index (or id)")
        rows.append({**{k: v for k, v in obj.items() if k not in ("id", "text")}, "index": index, PREDICTION: pred})
    return pd.DataFrame(rows, columns=None if rows else ["index", PREDICTION])


def split_collection(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """VLMEvalKit's collection file (`SUB_DATASET`, `original_index`) -> one frame per dataset."""
    out = {}
    for name, part in df.groupby("sub_dataset"):
        part = part.drop(columns=["index", "sub_dataset"]).rename(columns={"original_index": "index"})
        out[str(name)] = part
    return out


def scored_rows(ds: EvalDataset, preds: pd.DataFrame | None, path: Path | None,
                selected: list[int] | None = None) -> list[ScoredRow]:
    """The rows to score: every prediction row (columns from the file, the rest from DATA), or with
    `selected`, those DATA rows (a row without a prediction gets "nan": wrong unless judged)."""
    by_key: dict[str, dict[str, Any]] = {}
    if preds is not None:
        keys = [index_key(v) for v in preds["index"]]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ParrotError(f"{path}: index {dup} appears more than once; one prediction per row")
        unknown = [k for k in keys if k not in ds.position]
        if unknown:
            raise ParrotError(f"{path} does not match {ds.name} ({ds.path}): index {unknown[0]}"
                              f"{f' and {len(unknown) - 1} more' if len(unknown) > 1 else ''} not in it")
        for k, rec in zip(keys, preds.to_dict("records")):
            row = ds.rows[ds.position[k]]
            if "question" in rec and not _same_text(rec["question"], row["question"]):
                raise ParrotError(f"{path} does not match {ds.name} ({ds.path}): the question of index {k} differs "
                                  f"({cell(rec['question'])[:60]!r} vs {cell(row['question'])[:60]!r}); are these the "
                                  "predictions of another dataset or language?")
            by_key[k] = rec
    positions = selected if selected is not None else [ds.position[k] for k in by_key]
    out = []
    for pos in positions:
        key, row = ds.keys[pos], ds.rows[pos]
        rec = by_key.get(key)
        values = {**row, **{c: v for c, v in (rec or {}).items() if c not in ("index", PREDICTION, "image")}}
        prediction = cell(rec[PREDICTION]) if rec is not None else ""
        prediction = prediction or "nan"  # VLMEvalKit reads an empty cell as NaN, then str() -> "nan"
        out.append(ScoredRow(key, values, cell(row["answer"]), prediction))
    return out
