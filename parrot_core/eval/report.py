"""What `parrot eval` writes and prints once a dataset is scored.

- `<dataset>_acc.csv`: VLMEvalKit's `report_acc` table (`split`, `Overall`, each `l2-category`
  and `category`; fractions 0-1), written as VLMEvalKit's `dump` writes CSV (every field quoted).
- `<dataset>_result.tsv`: per row, the answer, the prediction, the option it was matched to and
  how (rule / judge / random / none), and the hit (for circular datasets, the whole question's).
- `summary.json`: every dataset's overall and per-category figures (datasets scored into the same
  folder earlier are kept); `summary.png`: accuracy per language and per category (matplotlib,
  optional).
- the terminal table: one row per dataset, the six languages of a benchmark side by side.
"""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

from ..errors import ParrotError
from ..storage.fsutil import atomic_output_file
from .scoring import GROUP_COLUMNS, MMB_ABBREVIATIONS, Scored
from .sources import LANGUAGES

SUMMARY = "summary.json"
PLOT = "summary.png"
LANGUAGE_NAMES = {"en": "en", "cn": "zh", "zh": "zh", "pt": "pt", "ar": "ar", "tr": "tr", "ru": "ru"}
_LANG = re.compile(r"^(.*)_(en|cn|zh|pt|ar|tr|ru)$", re.IGNORECASE)


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)


def write_acc_csv(scored: Scored, path: Path) -> None:
    import pandas as pd

    with atomic_output_file(path, "w", encoding="utf-8", newline="") as f:
        pd.DataFrame(scored.table, columns=scored.columns).to_csv(f, index=False, quoting=csv.QUOTE_ALL)


def write_result_tsv(scored: Scored, path: Path) -> None:
    cols = ["index", "answer", "prediction", "option", "how", "hit"] + (["question_index"] if scored.circular else [])
    with atomic_output_file(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n")
        w.writerow(cols)
        for r in scored.rows:
            rec = [r.key, r.answer, r.prediction, r.option or "", r.how, r.hit]
            w.writerow(rec + ([int(r.key) % 1_000_000] if scored.circular else []))


def dataset_summary(scored: Scored, **extra: Any) -> dict[str, Any]:
    """One dataset's entry of summary.json."""
    per_group: dict[str, dict[str, float | None]] = {}
    for group in GROUP_COLUMNS:
        labels = {str(u.values.get(group)) for u in scored.units if group in u.values}
        figures = {}
        for label in sorted(labels):
            hits = [u.hit for u in scored.units if str(u.values.get(group)) == label]
            figures[MMB_ABBREVIATIONS.get(label, label)] = _num(sum(hits) / len(hits))
        if figures:
            per_group["categories" if group == "category" else "l2_categories"] = figures
    rows = scored.rows
    return {
        "overall": _num(scored.overall),
        "questions": len(scored.units),
        "rows": len(rows),
        "circular": scored.circular,
        "matched_by": {how: sum(1 for r in rows if r.how == how) for how in ("rule", "judge", "random", "none")},
        **per_group,
        "splits": {sp: {k: _num(v) for k, v in figs.items()} for sp, figs in scored.by_split().items()},
        **extra,
    }


def read_summary(out_dir: Path) -> dict[str, Any]:
    path = out_dir / SUMMARY
    if not path.exists():
        return {"datasets": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), dict):
        raise ParrotError(f"{path}: exists and is not a parrot eval summary; choose another --output (or move it)")
    return data


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    with atomic_output_file(out_dir / SUMMARY, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
        f.write("\n")


def split_language(name: str) -> tuple[str, str | None]:
    """("MMMB", "zh") for "MMMB_cn"; (name, None) without a language suffix."""
    m = _LANG.match(name)
    return (m.group(1), LANGUAGE_NAMES[m.group(2).lower()]) if m else (name, None)


def results_table(figures: dict[str, float | None]) -> str:
    """The terminal table: a row per benchmark with its languages side by side, other datasets alone."""
    families: dict[str, dict[str, float | None]] = {}
    for name, value in figures.items():
        family, lang = split_language(name)
        families.setdefault(family if lang else name, {})[lang or "score"] = value
    order = [LANGUAGE_NAMES[lang] for lang in LANGUAGES]
    langs = [lang for lang in order if any(lang in f for f in families.values())]
    cols = langs + (["score"] if any("score" in f for f in families.values()) else [])
    width = max([len("dataset"), *map(len, families)])
    lines = ["  ".join(["dataset".ljust(width), *(c.rjust(6) for c in cols)])]
    for family, figs in families.items():
        cells = [("-" if figs.get(c) is None else f"{100 * figs[c]:.2f}").rjust(6) if c in figs else "".rjust(6)
                 for c in cols]
        lines.append("  ".join([family.ljust(width), *cells]))
    return "\n".join(lines)


def write_plot(out_dir: Path, summary: dict[str, Any]) -> bool:
    """summary.png: overall accuracy per language (one bar per benchmark), then per category for each
    benchmark (one bar per language). False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    order = {LANGUAGE_NAMES[lang]: i for i, lang in enumerate(LANGUAGES)}
    datasets = sorted(summary["datasets"].items(), key=lambda kv: (split_language(kv[0])[0],
                                                                   order.get(split_language(kv[0])[1], 99)))
    families: dict[str, dict[str, dict]] = {}
    for name, entry in datasets:
        family, lang = split_language(name)
        families.setdefault(family if lang else name, {})[lang or name] = entry
    fig, axes = plt.subplots(1 + len(families), 1, figsize=(12, 3.5 * (1 + len(families))), squeeze=False)
    _bars(axes[0][0], {f: {k: e.get("overall") for k, e in entries.items()} for f, entries in families.items()},
          "Overall accuracy per language")
    for ax, (family, entries) in zip(axes[1:, 0], families.items()):
        by_cat: dict[str, dict[str, float | None]] = {}
        for key, entry in entries.items():
            for cat, value in (entry.get("categories") or {}).items():
                by_cat.setdefault(key, {})[cat] = value
        _bars(ax, by_cat, f"{family}: accuracy per category", rotate=True)
    with warnings.catch_warnings():  # category names in scripts the default font lacks: shown as boxes
        warnings.filterwarnings("ignore", "Glyph .* missing from font", UserWarning)
        fig.tight_layout()
        with atomic_output_file(out_dir / PLOT, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return True


def _bars(ax, series: dict[str, dict[str, float | None]], title: str, rotate: bool = False) -> None:
    """Grouped bars: x = the inner keys, one bar per outer key."""
    xs = list(dict.fromkeys(k for s in series.values() for k in s))
    n = max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        heights = [100 * (values.get(x) or 0.0) for x in xs]
        ax.bar([j + (i - (n - 1) / 2) * 0.8 / n for j in range(len(xs))], heights, 0.8 / n, label=label)
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels(xs, rotation=45 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    if series:
        ax.legend(fontsize=7, ncols=min(len(series), 6))
