"""Fuzzing `parrot eval`'s inputs: damaged VLMEvalKit MCQ TSVs (read, every row's prompt built and its
image decoded as the model would see it) and damaged predictions files scored against a good TSV (the
whole `--predictions` path: read, match, score, write the reports). Whatever the bytes, the only
exception that escapes is ParrotError (see tests/fuzz.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fuzz import FUZZ, cases, mutate_bytes, only_parrot_errors, tsv_input, tsv_table, write
from hypothesis import given

pytest.importorskip("pandas", reason="parrot eval needs pandas: pip install 'parrot-vlm[eval]'")

from parrot.errors import ParrotError  # noqa: E402
from parrot.eval import EvalSettings, evaluate  # noqa: E402
from parrot.eval.data import read_dataset  # noqa: E402
from parrot.eval.predictions import read_predictions, scored_rows  # noqa: E402
from parrot.eval.prompt import build_prompt  # noqa: E402
from parrot.eval.scoring import score_rows  # noqa: E402
from parrot.eval.sources import DataSource  # noqa: E402
from parrot.model.image import ImageSettings, preprocess  # noqa: E402

SETTINGS = ImageSettings.clip_defaults(30)


def read_and_prepare(path: Path, name: str) -> int:
    """What `parrot eval` does with DATA before generating: every row's prompt and pixels."""
    ds = read_dataset(DataSource(name, path))
    for key, row in zip(ds.keys, ds.rows):
        assert isinstance(build_prompt(row, name), str)
        try:
            pixels = preprocess(ds.image_bytes(key), SETTINGS)
        except ParrotError:
            continue  # a row whose image does not decode: recorded for that row, the run goes on
        assert pixels.shape == (1, 3, 30, 30)
    return len(ds.rows)


@FUZZ(2000)
@given(r=cases())
def test_vlmevalkit_tsv_raises_only_parrot_errors(tmp_path_factory, r):
    root = tmp_path_factory.getbasetemp() / "fuzz-tsv"
    root.mkdir(exist_ok=True)
    name = r.choice(["MMMB_en", "MMBench_dev_ar", "toy"])  # MMBench: circular (integer indices)
    path = write(root / f"{name}.tsv", tsv_input(r))
    only_parrot_errors("VLMEvalKit TSV (read_dataset + prompts + images)", read_and_prepare, path, name)


PREDICTIONS = ("index\tquestion\tA\tB\tC\tD\tanswer\tcategory\tprediction\n"
               + "".join(f"{i}\tWhat colour?\tred\tgreen\tblue\tgrey\tA\tcolour\t{p}\n"
                         for i, p in enumerate(["A", "The answer is green.", "red"]))).encode()


def read_and_score(ds, predictions: Path) -> float:
    """Read a predictions file, match it to DATA's rows and score them (no reports written)."""
    rows = scored_rows(ds, read_predictions(predictions), predictions)
    return score_rows(rows, ds.circular).overall


def score(data: Path, predictions: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    return evaluate([DataSource("MMMB_en", data)], out, predictions=[predictions],
                    settings=EvalSettings(progress=False), echo=lambda m: None)


def _predictions_case(tmp_path_factory, r) -> tuple[Path, Path]:
    root = tmp_path_factory.getbasetemp() / "fuzz-predictions"
    root.mkdir(exist_ok=True)
    data = root / "data" / "MMMB_en.tsv"
    if not data.exists():
        data.parent.mkdir()
        data.write_bytes(tsv_table())
    suffix = r.choice([".tsv", ".csv", ".jsonl"])
    good = PREDICTIONS if suffix == ".tsv" else (
        PREDICTIONS.replace(b"\t", b",") if suffix == ".csv" else
        b'{"index": 0, "prediction": "A"}\n{"index": 1, "prediction": "B"}\n{"index": 2, "prediction": "red"}\n')
    return data, write(root / f"MMMB_en{suffix}", mutate_bytes(r, good))


@FUZZ(1000)
@given(r=cases())
def test_predictions_files_raise_only_parrot_errors(tmp_path_factory, r):
    data, path = _predictions_case(tmp_path_factory, r)
    ds = read_dataset(DataSource("MMMB_en", data), need_images=False)
    only_parrot_errors("predictions file (read, match, score)", read_and_score, ds, path)


@FUZZ(200)
@given(r=cases())
def test_eval_with_predictions_end_to_end_raises_only_parrot_errors(tmp_path_factory, r):
    data, path = _predictions_case(tmp_path_factory, r)
    only_parrot_errors("parrot eval --predictions (reports written)", score, data, path, path.parent / "out")
