"""Scoring predictions exactly as VLMEvalKit's multiple-choice evaluation does.

Written from a reading of `vlmeval/dataset/utils/multiple_choice.py` (`mcq_vanilla_eval`,
`mcq_circular_eval`, `prefetch_circular_group`, `eval_circular_group`, `extract_answer_from_item`,
`report_acc`) and `ImageMCQDataset.evaluate` (`dataset/image_mcq.py`) in AIDC-AI/Parrot's vendored
VLMEvalKit (commit 989d6d0):

- Each prediction is mapped to an option by the rule-based matcher (`matching.py`); the options are
  the row's non-empty letter columns, the ground truth is DATA's `answer`. Unmatched: wrong under
  exact matching, or asked of the LLM judge when there is one (`judge.py`).
- Vanilla (MMMB ...): a row is right when its option equals the answer.
- Circular (a name containing "mmbench", any case): rows whose index is equal modulo 1,000,000 are
  one question with rotated options, scored on the row with index < 1,000,000. Prefetch: any
  rotation matched to a wrong option fails the question, all matched and right passes it; otherwise
  (some unmatched) it fails under exact matching, and with a judge each unmatched rotation is judged
  in turn, the first wrong one failing the question.
- `report_acc`: one row per split (`none` without a split column), `Overall`, then every
  `l2-category` and every `category` (sorted), MMBench's abbreviations; fractions (mean of hits).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .matching import match_option
from .prompt import is_missing, options_of

CIRCULAR_BASE = 1_000_000
MMB_ABBREVIATIONS = {
    "coarse_perception": "CP",
    "finegrained_perception (instance-level)": "FP-S",
    "finegrained_perception (cross-instance)": "FP-C",
    "logic_reasoning": "LR",
    "relation_reasoning": "RR",
    "attribute_reasoning": "AR",
}
GROUP_COLUMNS = ("l2-category", "category")


class Judge(Protocol):
    def choose(self, question: str, choices: Mapping[str, Any], prediction: str, key: str) -> tuple[str, str]:
        """(option letter or "Z", how it was obtained: "judge" or "random")."""


@dataclass
class ScoredRow:
    """One row of the evaluated table and what its prediction was matched to."""

    key: str
    values: dict[str, Any]  # the row's columns (question, options, category, ...)
    answer: str  # the ground truth, from DATA
    prediction: str  # as VLMEvalKit holds it: str() of the cell ("nan" when empty)
    option: str | None = None  # the option letter (or "Z") it maps to; None: unmatched
    how: str = "none"  # "rule", "judge", "random" or "none" (unmatched, exact matching)
    hit: int = 0  # for circular datasets: the whole question's result

    @property
    def choices(self) -> dict[str, Any]:
        return options_of(self.values)


@dataclass
class Scored:
    """The scored units (rows, or questions when circular) and the report_acc table."""

    rows: list[ScoredRow]
    units: list[ScoredRow]  # vanilla: every row; circular: the rows with index < 1,000,000
    circular: bool
    columns: list[str] = field(default_factory=list)
    table: list[list[Any]] = field(default_factory=list)  # one row per split, `columns` wide

    @property
    def overall(self) -> float:
        return _mean([u.hit for u in self.units])

    def by_split(self) -> dict[str, dict[str, float]]:
        return {str(r[0]): dict(zip(self.columns[1:], r[1:])) for r in self.table}


def sort_key(key: str) -> tuple:
    """VLMEvalKit sorts predictions by index: numbers numerically, text after them."""
    return (0, int(key), "") if key.lstrip("-").isdigit() else (1, 0, key)


def _extract(row: ScoredRow, judge: Judge | None) -> None:
    opt = match_option(row.prediction, row.choices)
    if opt:
        row.option, row.how = opt, "rule"
    elif judge is not None:
        row.option, row.how = judge.choose(str(row.values.get("question")), row.choices, row.prediction, row.key)


def score_rows(rows: Sequence[ScoredRow], circular: bool, judge: Judge | None = None) -> Scored:
    """Scores the rows (see the module doc) and builds the report_acc table."""
    rows = sorted(rows, key=lambda r: sort_key(r.key))
    if not circular:
        for r in rows:
            _extract(r, judge)
            r.hit = int(r.option is not None and r.option == r.answer)
        units = rows
    else:
        groups: dict[int, list[ScoredRow]] = {}
        for r in rows:
            groups.setdefault(int(r.key) % CIRCULAR_BASE, []).append(r)
        units = [r for r in rows if int(r.key) < CIRCULAR_BASE]
        for main in units:
            hit = _circular_group(groups[int(main.key)], judge)
            for r in groups[int(main.key)]:
                r.hit = hit
    out = Scored(rows, units, circular)
    out.columns, out.table = report_acc(units, set().union(*(r.values for r in rows)))
    return out


def _circular_group(group: list[ScoredRow], judge: Judge | None) -> int:
    for r in group:  # prefetch with the rules
        r.option = match_option(r.prediction, r.choices) or None
        r.how = "rule" if r.option else "none"
        if r.option and r.option != r.answer:
            return 0
    if all(r.option == r.answer for r in group):
        return 1
    if judge is None:
        return 0
    for r in group:
        if r.option is None:
            _extract(r, judge)
            if r.option != r.answer:
                return 0
    return 1


def _mean(hits: Sequence[int]) -> float:
    return sum(hits) / len(hits) if hits else math.nan


def _label(value: Any) -> str:
    return "nan" if is_missing(value) else str(value)


def report_acc(units: Sequence[ScoredRow], has_columns: set[str]) -> tuple[list[str], list[list[Any]]]:
    """VLMEvalKit's report_acc layout: columns `split`, `Overall`, then each l2-category and category."""
    split_of = {id(u): _label(u.values.get("split")) if "split" in has_columns else "none" for u in units}
    splits = sorted(set(split_of.values()))
    columns: dict[str, list[float]] = {"Overall": [_mean([u.hit for u in units if split_of[id(u)] == sp])
                                                   for sp in splits]}
    for group in GROUP_COLUMNS:
        if group not in has_columns:
            continue
        for ability in sorted({_label(u.values.get(group)) for u in units}):
            name = MMB_ABBREVIATIONS.get(ability, ability)
            columns[name] = [_mean([u.hit for u in units if split_of[id(u)] == sp
                                    and _label(u.values.get(group)) == ability]) for sp in splits]
    names = ["split", *columns]
    return names, [[sp, *(columns[c][i] for c in columns)] for i, sp in enumerate(splits)]
