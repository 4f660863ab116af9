"""Pieces of the demo recipe (scripts/make_demo.py) that need no training: the attribute labels its tower
pre-training learns, as read from the generator's labels.json, agree with what the stage-1 captions say."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from parrot.demo import phrases as P
from parrot.demo.data import build

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_demo", ROOT / "scripts" / "make_demo.py")
make_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_demo)


def test_tower_labels_agree_with_the_captions(tmp_path):
    build(tmp_path, n_stage1=120, n_stage2=12, n_heldout=4, seed=5)
    labels = json.loads((tmp_path / "labels.json").read_text())
    stage1 = json.loads((tmp_path / "stage1.json").read_text())
    names = [s["image"] for s in stage1]
    y = make_demo.label_matrix(labels, names)
    assert y.shape == (120, 4)
    where = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
    singles = 0
    for row, s in zip(y, stage1):
        text = s["conversations"][1]["value"].lower()
        count = int(row[3]) + 1
        if count == 1:
            singles += 1
            colour, shape, position = P.COLOURS[row[0]], P.SHAPES[row[1]], P.POSITIONS[row[2]]
            assert text.startswith(f"a {colour} {shape} ") or text.startswith(f"an {colour} {shape} "), text
            assert where[position] in text
        else:
            assert list(row[:3]) == [-100, -100, -100]
            assert text.startswith(["two", "three", "four"][count - 2] + " shapes:")
            assert text.count(",") + 2 == count
    assert 30 < singles < 110
