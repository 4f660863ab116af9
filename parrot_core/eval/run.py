"""Answering a dataset with a model, resumably, batched and data-parallel (`parrot eval`).

Each question is asked as VLMEvalKit's Parrot wrapper asks it (`prompt.py`): the prompt as the one
user turn after the image, greedy decoding, at most `max_tokens` (512) new tokens, stop at
`<|im_end|>`, the wrapper's clean-up of the decoded answer. Answers are appended to
`<dataset>.tsv` as they come (`predictions.py`), so a killed run resumes where it stopped.

Data-parallel (torchrun): rank r answers the selected rows at positions p with p % world == r
that are not answered yet (ownership is fixed, so ranks never need each other's progress); every
rank reads the existing answers before any rank writes (`barrier`), writes its own part file, and
rank 0 merges the parts into `<dataset>.tsv` once all ranks are done. Greedy answers do not depend
on the batch or the shard, so the files equal a one-process run's.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ParrotError
from ..inference.batch import Request, generate_each
from ..inference.generation import ImageCache, SamplingParams
from .data import EvalDataset
from .predictions import AnswerFile, cell, check_answers, output_columns
from .prompt import build_prompt, build_query, clean_answer, query_ids


@dataclass
class AnswerRun:
    """What answering one dataset did (this process's share)."""

    name: str
    selected: list[int]  # DATA positions to answer (all, or --limit)
    answered_before: int = 0  # rows already answered by earlier runs
    answered: int = 0  # rows answered now (this rank)
    errors: dict[str, str] = field(default_factory=dict)  # index key -> why it could not be answered
    seconds: float = 0.0

    @property
    def questions_per_s(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0


def answer_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.tsv"


def part_path(out_dir: Path, name: str, rank: int) -> Path:
    return out_dir / f".{name}.rank{rank}.tsv"


def _parts(out_dir: Path, name: str) -> list[Path]:
    return sorted(out_dir.glob(f".{name}.rank*.tsv"))


def read_answers(ds: EvalDataset, out_dir: Path, own: Path | None = None) -> dict[str, list[str]]:
    """Every complete answer record in `<dataset>.tsv` and the rank parts (only `own` is repaired)."""
    cols = output_columns(ds)
    answers: dict[str, list[str]] = {}
    for path in [answer_path(out_dir, ds.name), *_parts(out_dir, ds.name)]:
        found = AnswerFile(path, cols).read(repair=path == own)
        check_answers(ds, found, path)
        for k, rec in found.items():
            answers.setdefault(k, rec)
    return answers


class _Pixels:
    """Preprocessed images by row image, a few at a time (MMBench rotations share one image)."""

    def __init__(self, model, ds: EvalDataset, size: int):
        self.model, self.ds, self.size = model, ds, size
        self._items: OrderedDict[str, object] = OrderedDict()

    def get(self, key: str):
        ref = self.ds.images.get(key, key)
        ref = ref.strip() if len(ref) <= 64 else key  # a reference to another row's image
        if ref not in self._items:
            self._items[ref] = self.model.preprocess(self.ds.image_bytes(key))
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        self._items.move_to_end(ref)
        return self._items[ref]


def answer_dataset(
    model,
    ds: EvalDataset,
    out_dir: Path,
    batch_size: int = 1,
    limit: int | None = None,
    max_tokens: int = 512,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
) -> AnswerRun:
    """Answers this rank's share of the rows not answered yet; returns what it did.

    Rows whose image cannot be used, or whose prompt the model refuses, are recorded in `errors`
    (not written: a rerun tries them again). Call `merge_answers` on rank 0 afterwards.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ParrotError(f"batch size must be an integer >= 1 (got {batch_size!r})")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    run = AnswerRun(ds.name, ds.select(limit))
    own = answer_path(out_dir, ds.name) if world == 1 else part_path(out_dir, ds.name, rank)
    answers = read_answers(ds, out_dir, own)
    if barrier is not None:
        barrier()  # everyone has read before anyone appends
    run.answered_before = sum(1 for p in run.selected if ds.keys[p] in answers)
    mine = [p for i, p in enumerate(run.selected) if i % world == rank and ds.keys[p] not in answers]
    if not mine:
        return run
    t0 = time.perf_counter()
    out = AnswerFile(own, output_columns(ds))
    pixels, images = _Pixels(model, ds, max(2, 2 * batch_size)), ImageCache(size=max(2, batch_size))
    bar = _bar(len(mine), ds.name, rank, world) if progress else None
    try:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            records = _answer_chunk(model, ds, chunk, params, pixels, images, run.errors)
            out.append(records)
            run.answered += len(records)
            if bar is not None:
                bar.update(len(chunk))
                if run.errors:
                    bar.set_postfix_str(f"{len(run.errors)} errors", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        run.seconds = time.perf_counter() - t0
    return run


def _answer_chunk(model, ds: EvalDataset, chunk: list[int], params: SamplingParams, pixels: _Pixels,
                  images: ImageCache, errors: dict[str, str]) -> list[list[str]]:
    ready: list[tuple[int, str, Request]] = []
    for pos in chunk:
        key, row = ds.keys[pos], ds.rows[pos]
        try:
            query = build_query(build_prompt(row, ds.name))
            ids = query_ids(model.tokenizer, query)
            ready.append((pos, query, Request(query, pixels.get(key), params, input_ids=ids)))
        except ParrotError as e:
            errors[key] = str(e)
    answers = generate_each(model, [r for _, _, r in ready], images)
    cols = output_columns(ds)[:-1]  # DATA's columns; the prediction comes last
    records = []
    for (pos, query, _), result in zip(ready, answers):
        if isinstance(result, ParrotError):
            errors[ds.keys[pos]] = str(result)
            continue
        text = model.tokenizer.decode(result.tokens, skip_special_tokens=True)
        row = ds.rows[pos]
        records.append([cell(row[c]) for c in cols] + [clean_answer(query, text)])
    return records



def merge_answers(ds: EvalDataset, out_dir: Path) -> int:
    """Rank 0, after every rank is done: `<dataset>.tsv` = all answers in DATA order (atomically), the
    rank parts removed. Returns the number of answered rows."""
    answers = read_answers(ds, out_dir)
    parts = _parts(out_dir, ds.name)
    main = AnswerFile(answer_path(out_dir, ds.name), output_columns(ds))
    ordered = [answers[k] for k in ds.keys if k in answers]
    main.rewrite(ordered)
    for p in parts:
        p.unlink()
    return len(ordered)


def _bar(total: int, name: str, rank: int, world: int):
    from tqdm import tqdm

    desc = name if world == 1 else f"{name} (rank {rank}/{world})"
    return tqdm(total=total, unit="q", desc=desc, dynamic_ncols=True, disable=rank != 0)
