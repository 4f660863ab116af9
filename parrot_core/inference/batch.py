"""Answering several requests at once: batched prefill and decode.

Each request's prompt is embedded on its own (its visual tokens come from its image and its own
text, the vision work cached per image), so a batch feeds the LLM exactly the embeddings that
one-by-one calls would. The backend then runs the LLM over the left-padded batch: one prefill,
then one decode step per token for the rows still running; a row leaves the batch at its stop
token or its max_tokens (`generate_tokens_batch` on both backends).

In a batch, the speed figures of each result are the batch's: `prompt_tps` is the prompt
positions of all rows over the batched prefill, `generation_tps` all rows' tokens over the decode,
`time_to_first_token` runs from the call to the batch's first token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ParrotError
from ..model.prompt import check_image_placeholder
from .detokenizer import StreamingDetokenizer
from .generation import GenerationResult, ImageCache, SamplingParams, generate_stream


@dataclass(frozen=True)
class Request:
    """One question. image: a path, a PIL image, float32 pixels [1, 3, H, W] (`model.preprocess`), or None.
    input_ids: a ready prompt (ids, -200 where the image goes) used instead of templating `prompt`."""

    prompt: str
    image: Any = None
    params: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None
    input_ids: list[int] | None = None


@dataclass
class _Row:
    ids: list[int]
    pixels: np.ndarray | None
    params: SamplingParams
    result: GenerationResult
    detok: StreamingDetokenizer
    t_last: float = 0.0


def generate_batch(
    model, requests: Sequence[Request], images: ImageCache | None = None, stop: frozenset[int] | None = None
) -> list[GenerationResult]:
    """Answers `requests` together (one batch); results in the same order.

    A single request takes the one-by-one path (`generate_stream`). Bad prompts, settings or images
    raise ParrotError before any generation. `images` caches vision outputs across calls; `stop`:
    token ids that end an answer (default: the model's; empty: every row generates max_tokens).
    """
    t0 = time.perf_counter()
    images = images if images is not None else ImageCache(size=max(2, len(requests)))
    stop = model.stop_ids if stop is None else frozenset(stop)
    rows = [_prepare(model, r) for r in requests]
    if len(rows) == 1:
        r = rows[0]
        return [generate_stream(model, r.ids, r.pixels, r.params, images=images, stop=stop).consume()]
    if not rows:
        return []
    model.reset_peak_memory()
    embeds = []
    with_image = [r for r in rows if r.pixels is not None]
    t_vis = time.perf_counter()
    encodings = dict(zip(map(id, with_image), images.get_many(model, [r.pixels for r in with_image])))
    n_computed = sum(computed for _, computed in encodings.values())
    vision_time = (time.perf_counter() - t_vis) / max(n_computed, 1)  # one batch: its time shared out
    for r in rows:
        enc = None
        if r.pixels is not None:
            enc, computed = encodings[id(r)]
            r.result.vision_time = vision_time if computed else 0.0
        embeds.append(model.embed_prompt(r.ids, None if enc is None else enc.features,
                                         None if enc is None else enc.experts))
        r.result.prompt_tokens = r.result.prefill_tokens = int(embeds[-1].shape[1])
    t_prefill = time.perf_counter()
    t_first = None
    for step in model.generate_tokens_batch(embeds, [r.params for r in rows], stop):
        now = time.perf_counter()
        t_first = t_first or now
        for i, token in step:
            row = rows[i]
            row.t_last = now
            row.result.generation_tokens += 1
            if token in stop:
                row.result.finish_reason = "stop"
                continue
            row.result.tokens.append(token)
            row.detok.add(token)
            if len(row.result.tokens) >= row.params.max_tokens:
                row.result.finish_reason = "length"
    t_end = max(r.t_last for r in rows)
    prompt_tps = sum(r.result.prefill_tokens for r in rows) / max(t_first - t_prefill, 1e-9)
    decoded = sum(r.result.generation_tokens - 1 for r in rows)
    generation_tps = decoded / max(t_end - t_first, 1e-9) if decoded else 0.0
    peak = model.peak_memory() / 1e9
    for r in rows:
        r.detok.finalize()
        res = r.result
        res.text = r.detok.text
        res.time_to_first_token = t_first - t0
        res.prompt_tps, res.generation_tps, res.peak_memory = prompt_tps, generation_tps, peak
    return [r.result for r in rows]


def _prepare(model, request: Request) -> _Row:
    if not isinstance(request, Request):
        raise ParrotError(f"expected a parrot.inference.batch.Request (got {type(request).__name__})")
    if not isinstance(request.prompt, str):
        raise ParrotError(f"prompt must be a string (got {type(request.prompt).__name__})")
    params = request.params.with_seed()
    image = request.image
    pixels = None if image is None else image if isinstance(image, np.ndarray) else model.preprocess(image)
    if request.input_ids is None:
        ids = model.encode_prompt(request.prompt, pixels is not None, request.system)
    else:
        ids = list(request.input_ids)
        check_image_placeholder(ids, pixels is not None)
    result = GenerationResult(seed=None if params.greedy else params.seed)
    return _Row(ids, pixels, params, result, StreamingDetokenizer(model.tokenizer))


def generate_many(
    model, requests: Sequence[Request], batch_size: int = 8, images: ImageCache | None = None,
) -> Iterator[GenerationResult]:
    """Yields the results of `requests` in order, `batch_size` at a time."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ParrotError(f"batch_size must be an integer >= 1 (got {batch_size!r})")
    images = images if images is not None else ImageCache(size=max(2, batch_size))
    for start in range(0, len(requests), batch_size):
        yield from generate_batch(model, requests[start:start + batch_size], images)


def generate_each(model, requests: Sequence[Request], images: ImageCache | None = None
                  ) -> list[GenerationResult | ParrotError]:
    """Results of `requests` answered as one batch; when the batch fails on a bad request, each request
    alone, so one bad request costs only its own answer (its error in its place)."""
    if not requests:
        return []
    try:
        return generate_batch(model, requests, images)
    except ParrotError as e:
        if len(requests) == 1:
            return [e]
    return [generate_each(model, [r], images)[0] for r in requests]
