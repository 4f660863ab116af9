"""Small VLMEvalKit-style MCQ datasets for the `parrot eval` tests (base64 images, pandas quoting)."""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

QUESTIONS = [
    ("What colour is the square?", ["red", "green", "blue", "yellow"], "A", "color"),
    ("How many objects are there?", ["one", "two", "three", None], "B", "count"),
    ("Is it \"day\" or night?\tThink.", ["day", "night", None, None], "A", "scene"),
    ("Which shape is it?\nLook closely.", ["circle", "square", "triangle", "star"], "D", "shape"),
    ("What is the texture?", ["smooth", "rough", "striped", None], "C", "color"),
]


def image_b64(seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB", fmt: str = "PNG") -> str:
    rng = np.random.default_rng(seed)
    im = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    """Writes rows as VLMEvalKit's dump does (tab-separated, every field quoted; None -> empty)."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r[c] for c in columns])
    return path


def mcq_rows(n: int = 5, hint: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        q, opts, ans, cat = QUESTIONS[i % len(QUESTIONS)]
        row = {"index": i, "question": q, **dict(zip("ABCD", opts)), "answer": ans, "category": cat,
               "l2-category": "perception" if cat in ("color", "shape") else "reasoning",
               "hint": "A hint." if hint and i == 1 else None, "image": image_b64(i)}
        rows.append(row)
    return rows


def circular_rows(n_questions: int = 2) -> list[dict]:
    """MMBench style: each question with its options rotated, rotations at index + k * 1,000,000,
    their image cell naming the main row's index."""
    rows = []
    for q in range(n_questions):
        text, opts, ans, cat = QUESTIONS[q]
        opts = [o for o in opts if o is not None]
        right = opts["ABCD".index(ans)]
        for k in range(len(opts)):
            rot = opts[k:] + opts[:k]
            rows.append({"index": q + k * 1_000_000, "question": text, **dict(zip("ABCD", rot)),
                         "answer": "ABCD"[rot.index(right)], "category": cat, "l2-category": "perception",
                         "split": "dev", "image": image_b64(q) if k == 0 else str(q)})
    return rows
