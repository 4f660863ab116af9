"""Exact matching, circular evaluation and the report_acc table, against VLMEvalKit's rules
(`multiple_choice.py`, vendored 989d6d0) worked out by hand."""

from __future__ import annotations

import math

from parrot.eval.scoring import ScoredRow, score_rows


def row(index: int, answer: str, prediction: str, options=("red", "green", "blue", "yellow"), **values) -> ScoredRow:
    v = {"index": index, "question": "Which colour?", **dict(zip("ABCD", options)), "answer": answer, **values}
    return ScoredRow(str(index), v, answer, prediction)


def rotations(q: int, right: str, predictions: list[str], **values) -> list[ScoredRow]:
    """Question q with its 4 options rotated (index q + k * 1e6); `right` is the correct text."""
    opts = ["red", "green", "blue", "yellow"]
    out = []
    for k, pred in enumerate(predictions):
        rot = opts[k:] + opts[:k]
        out.append(row(q + k * 1_000_000, "ABCD"[rot.index(right)], pred, rot, **values))
    return out


def test_vanilla_hits_and_report_layout():
    rows = [row(1, "A", "A", category="color", **{"l2-category": "perception"}),
            row(2, "B", "It is green", category="color", **{"l2-category": "perception"}),
            row(3, "C", "D", category="count", **{"l2-category": "reasoning"}),
            row(4, "D", "nan", category="count", **{"l2-category": "reasoning"}),
            row(5, "A", "Z", category="shape", **{"l2-category": "perception"})]
    s = score_rows(rows, circular=False)
    assert [r.hit for r in s.rows] == [1, 1, 0, 0, 0]
    assert [r.option for r in s.rows] == ["A", "B", "D", None, "Z"]
    assert [r.how for r in s.rows] == ["rule", "rule", "rule", "none", "rule"]
    # split "none" without a split column; Overall; l2-categories then categories, each sorted
    assert s.columns == ["split", "Overall", "perception", "reasoning", "color", "count", "shape"]
    assert s.table == [["none", 0.4, 2 / 3, 0.0, 1.0, 0.0, 0.0]]


def test_report_has_a_row_per_split_and_mmbench_abbreviations():
    rows = [row(1, "A", "A", split="dev", category="coarse_perception"),
            row(2, "A", "B", split="dev", category="logic_reasoning"),
            row(3, "A", "A", split="test", category="finegrained_perception (instance-level)"),
            row(4, "A", "A", split="test", category="logic_reasoning")]
    s = score_rows(rows, circular=False)
    assert s.columns == ["split", "Overall", "CP", "FP-S", "LR"]
    dev, test = s.table
    assert dev[:3] == ["dev", 0.5, 1.0] and math.isnan(dev[3]) and dev[4] == 0.0
    assert test[:2] == ["test", 1.0] and math.isnan(test[2]) and test[3:] == [1.0, 1.0]


def test_circular_question_counts_only_when_every_rotation_is_right():
    all_right = rotations(0, "blue", ["C", "B", "A", "D"])  # blue sits at C, B, A, D in the rotations
    one_wrong = rotations(1, "blue", ["C", "B", "A", "A"])
    by_text = rotations(2, "red", ["red", "it is red", "Red!", "D"])  # red: A, D, C, B -> last one wrong
    unmatched = rotations(3, "green", ["B", "A", "I do not know", "C"])  # one unmatched, the rest right
    refused = rotations(4, "green", ["B", "A", "Z", "C"])  # Z is an answer, and a wrong one
    s = score_rows(all_right + one_wrong + by_text + unmatched + refused, circular=True)
    assert [u.key for u in s.units] == ["0", "1", "2", "3", "4"]
    assert [u.hit for u in s.units] == [1, 0, 0, 0, 0]
    assert s.overall == 0.2
    assert s.columns == ["split", "Overall"] and s.table == [["none", 0.2]]


class StubJudge:
    """Answers every unmatched prediction with a fixed letter; records what it was asked."""

    def __init__(self, letter: str):
        self.letter, self.asked = letter, []

    def choose(self, question, choices, prediction, key):
        self.asked.append((key, prediction))
        return self.letter, "judge"


def test_circular_unmatched_rotation_goes_to_the_judge():
    # rotation 2 of green: options blue, yellow, red, green -> green is D
    group = rotations(3, "green", ["B", "A", "I do not know", "C"])
    judge = StubJudge("D")
    s = score_rows(group, circular=True, judge=judge)
    assert judge.asked == [("2000003", "I do not know")]
    assert [u.hit for u in s.units] == [1]
    assert s.rows[2].how == "judge"
    wrong = score_rows(rotations(3, "green", ["B", "A", "I do not know", "C"]), circular=True, judge=StubJudge("A"))
    assert [u.hit for u in wrong.units] == [0]


def test_circular_prefetch_failure_never_asks_the_judge():
    judge = StubJudge("A")
    s = score_rows(rotations(1, "blue", ["C", "?", "A", "A"]), circular=True, judge=judge)
    assert judge.asked == [] and s.units[0].hit == 0


def test_circular_rows_are_grouped_by_index_modulo_a_million_and_scored_on_the_main_row():
    rows = rotations(7, "red", ["A", "D", "C", "B"], category="x", split="dev")
    rows[1].values["category"] = "ignored: the main row's category counts"
    s = score_rows(list(reversed(rows)), circular=True)
    assert [u.key for u in s.units] == ["7"]
    assert s.columns == ["split", "Overall", "x"] and s.table == [["dev", 1.0, 1.0]]
    assert all(r.hit == 1 for r in s.rows)
