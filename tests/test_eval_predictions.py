"""Scoring prediction files without a model: VLMEvalKit's XLSX (per dataset and collection), TSV, CSV,
our JSONL; files that do not match DATA; the outputs (acc CSV layout, summary, answers file)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pandas as pd
import pytest
from eval_helpers import circular_rows, mcq_rows, write_tsv

from conftest import assert_clean_failure, run_parrot, without_packages
from parrot.errors import ParrotError
from parrot.eval import evaluate
from parrot.eval.sources import DataSource

# rows: 0 (answer A, color), 1 (B "two", count), 2 (A, scene), 3 (D, shape), 4 (C, color)
PREDS = ["A", "It is two.", "B", "circle or star", "Z"]  # rule: A, B (text), B, -, Z -> hits 1, 1, 0, 0, 0


def _data(tmp_path, name="MMMB_en"):
    path = write_tsv(tmp_path / "data" / f"{name}.tsv", mcq_rows(5))
    return DataSource(name, path)


def _vlmevalkit_frame(rows, preds):
    """What VLMEvalKit's infer_data_job dumps: every DATA column but image, plus prediction."""
    df = pd.DataFrame([{k: v for k, v in r.items() if k != "image"} for r in rows])
    df["prediction"] = preds
    return df


def test_vlmevalkit_xlsx_is_scored_as_vlmevalkit_does(tmp_path):
    src = _data(tmp_path)
    preds = PREDS[:3] + [None, "Z"]  # an empty cell: read back as NaN -> "nan"
    xlsx = tmp_path / "Parrot" / "Parrot_MMMB_en.xlsx"
    xlsx.parent.mkdir()
    _vlmevalkit_frame(mcq_rows(5), preds).to_excel(xlsx, index=False)
    out = tmp_path / "out"
    summary = evaluate([src], out, predictions=[xlsx.parent], echo=lambda m: None)
    entry = summary["datasets"]["MMMB_en"]
    assert entry["overall"] == 0.4 and entry["questions"] == 5
    assert entry["matched_by"] == {"rule": 4, "judge": 0, "random": 0, "none": 1}
    assert entry["categories"] == {"color": 0.5, "count": 1.0, "scene": 0.0, "shape": 0.0}
    with open(out / "MMMB_en_acc.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["split", "Overall", "perception", "reasoning", "color", "count", "scene", "shape"]
    assert [float(x) for x in table[1][1:]] == [0.4, 1 / 3, 0.5, 0.5, 1.0, 0.0, 0.0]
    assert (out / "MMMB_en_acc.csv").read_text().startswith('"split","Overall"')  # quoted, as VLMEvalKit dumps
    answers = pd.read_csv(out / "MMMB_en.tsv", sep="\t")
    assert list(answers.columns) == [c for c in mcq_rows(1)[0] if c != "image"] + ["prediction"]
    assert answers["prediction"].isna().tolist() == [False, False, False, True, False]
    assert (out / "summary.png").stat().st_size > 0


def test_collection_file_and_other_formats(tmp_path):
    en, pt = _data(tmp_path, "MMMB_en"), _data(tmp_path, "mmmb_pt")  # as the downloaded file is named
    frames = []
    for name, preds in (("MMMB_en", PREDS), ("MMMB_pt", ["B"] * 5)):
        df = _vlmevalkit_frame(mcq_rows(5), preds)
        df["SUB_DATASET"] = name
        frames.append(df)
    coll = pd.concat(frames)
    coll["original_index"] = coll.pop("index")
    coll["index"] = range(len(coll))  # VLMEvalKit's ConcatDataset renumbers
    xlsx = tmp_path / "Parrot_MMMB.xlsx"
    coll.to_excel(xlsx, index=False)
    summary = evaluate([en, pt], tmp_path / "out", predictions=[xlsx], echo=lambda m: None)
    assert summary["datasets"]["MMMB_en"]["overall"] == 0.4
    assert summary["datasets"]["mmmb_pt"]["overall"] == 0.2  # only row 1's answer is B

    jsonl = tmp_path / "answers.jsonl"  # parrot generate's output, an error row included
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": 0, "text": "A"}, {"id": 1, "text": "B"}, {"id": 2, "error": "image not found"},
        {"id": 3, "text": "D."}, {"id": 4, "text": "C"}]))
    s = evaluate([en], tmp_path / "out2", predictions=[jsonl], echo=lambda m: None)
    assert s["datasets"]["MMMB_en"]["overall"] == 1.0 and s["datasets"]["MMMB_en"]["questions"] == 4

    csv_file = tmp_path / "p.csv"
    pd.DataFrame({"Index": [3, 4], "Prediction": ["1", "C"]}).to_csv(csv_file, index=False)
    s = evaluate([en], tmp_path / "out3", predictions=[csv_file], echo=lambda m: None)
    assert s["datasets"]["MMMB_en"]["overall"] == 0.5  # a subset: 2 rows, "1" kept as text


def test_circular_predictions_tsv(tmp_path):
    rows = circular_rows(2)  # question 0: red at A, D, C, B; question 1 (three options): "two" at B, A, C
    path = write_tsv(tmp_path / "MMBench_dev_en.tsv", rows)
    preds = ["A", "D", "C", "B", "B", "A", "A"]
    pred_file = write_tsv(tmp_path / "preds.tsv", [{"index": r["index"], "prediction": p} for r, p in zip(rows, preds)])
    s = evaluate([DataSource("MMBench_dev_en", path)], tmp_path / "out", predictions=[pred_file], echo=lambda m: None)
    entry = s["datasets"]["MMBench_dev_en"]
    assert entry["circular"] and entry["questions"] == 2 and entry["overall"] == 0.5
    result = pd.read_csv(tmp_path / "out" / "MMBench_dev_en_result.tsv", sep="\t")
    assert result["index"].tolist() == [0, 1, 1000000, 1000001, 2000000, 2000001, 3000000]
    assert result["hit"].tolist() == [1, 0, 1, 0, 1, 0, 1] and result["question_index"].tolist() == [0, 1] * 3 + [0]


@pytest.mark.parametrize("frame, message", [
    (lambda df: df.assign(question="Something else?"), "question of index 0 differs"),
    (lambda df: df.assign(index=df["index"] + 100), "index 100 and 4 more not in it"),
    (lambda df: df.drop(columns=["prediction"]), "no 'prediction' column"),
    (lambda df: pd.concat([df, df.iloc[:1]]), "index 0 appears more than once"),
])
def test_predictions_that_do_not_match_data_are_refused(tmp_path, frame, message):
    src = _data(tmp_path)
    xlsx = tmp_path / "p.xlsx"
    frame(_vlmevalkit_frame(mcq_rows(5), PREDS)).to_excel(xlsx, index=False)
    with pytest.raises(ParrotError, match=message):
        evaluate([src], tmp_path / "out", predictions=[xlsx], echo=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_cli_scores_predictions_and_refuses_bad_input(tmp_path):
    src = _data(tmp_path)
    tsv = write_tsv(tmp_path / "Parrot_MMMB_en.tsv", [{"index": i, "prediction": p} for i, p in enumerate(PREDS)])
    p = run_parrot("eval", src.path, "--predictions", tsv, "--output", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    assert "MMMB" in p.stdout and "40.00" in p.stdout
    rows = mcq_rows(5)
    rows[3]["answer"] = "E"  # not an option of row 3: reported at the end, scored as wrong, the run goes on
    faulty = write_tsv(tmp_path / "faulty" / "MMMB_en.tsv", rows)
    p = run_parrot("eval", faulty, "--predictions", tsv, "--output", tmp_path / "out-faulty")
    assert p.returncode == 0 and "40.00" in p.stdout
    assert "1 rows of DATA are faulty" in p.stderr and "index 3: answer 'E' is not one of its options" in p.stderr
    assert_clean_failure(run_parrot("eval", src.path, "--predictions", tsv, "--output", src.path.parent),
                         "contains the DATA")
    assert_clean_failure(run_parrot("eval", src.path, "--predictions", tsv, "--model", "x", "-o", tmp_path / "o"),
                         "--model", "--predictions")
    assert_clean_failure(run_parrot("eval", tmp_path / "nope.tsv", "--predictions", tsv, "-o", tmp_path / "o"),
                         "not a dataset name known here")
    broken = tmp_path / "broken.xlsx"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    assert_clean_failure(run_parrot("eval", src.path, "--predictions", broken, "-o", tmp_path / "o2"),
                         "not a readable XLSX")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_optional_packages(tmp_path):
    code = "import sys, parrot, parrot.cli.main; print('pandas' in sys.modules, 'matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == ["False"] * 2
    src = _data(tmp_path)
    tsv = write_tsv(tmp_path / "p.tsv", [{"index": i, "prediction": p} for i, p in enumerate(PREDS)])
    p = run_parrot("eval", src.path, "--predictions", tsv, "-o", tmp_path / "o", env=without_packages("pandas"))
    assert_clean_failure(p, "needs pandas", "pip install 'parrot-vlm[eval]'")
    p = run_parrot("eval", src.path, "--predictions", tsv, "-o", tmp_path / "o", env=without_packages("matplotlib"))
    assert p.returncode == 0 and "matplotlib is not installed" in p.stderr
    assert (tmp_path / "o" / "summary.json").exists() and not (tmp_path / "o" / "summary.png").exists()
