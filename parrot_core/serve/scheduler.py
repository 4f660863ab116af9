"""Continuous batching for `parrot serve`: one thread owns the model and runs the decode batch.

Requests (`Job`s) wait in a bounded queue; between two decode steps the scheduler lets waiting jobs
join the batch (up to `max_batch` rows: each prompt is embedded, its vision work taken from the image
cache, and prefilled alone by `DecodeBatch.add`) and drops the rows that are done: a stop token,
their max_tokens, a stop string, or a client that went away (`Job.cancel`). Every step then advances
all rows at once. The model is reached only through the backend contract (parrot.contract), so this
runs unchanged on every backend; greedy rows answer exactly as they would alone.

The vision work of an image (CLIP + projector and the MoE experts' outputs) is cached by pixel hash,
as `parrot chat` does, so a follow-up turn about the same image does not run CLIP again.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ParrotError
from ..inference.detokenizer import StreamingDetokenizer
from ..inference.generation import ImageCache, SamplingParams
from .protocol import APIError


@dataclass
class Job:
    """One request. `emit(kind, data)` is called from the scheduler thread: ("delta", text) as the answer
    grows, then ("done", None) or ("error", APIError); the figures below are final at "done"."""

    ids: list[int]
    pixels: np.ndarray | None
    params: SamplingParams
    emit: Callable[[str, Any], None]
    stop: list[str] = field(default_factory=list)
    prompt_tokens: int = 0  # positions with the visual tokens spliced in
    completion_tokens: int = 0  # tokens of the answer (a stop token not counted)
    finish_reason: str | None = None  # "stop" or "length"
    text: str = ""
    cancelled: bool = False

    def cancel(self) -> None:
        """The client left: the row leaves the batch before the next step."""
        self.cancelled = True


@dataclass
class _Row:
    job: Job
    detok: StreamingDetokenizer
    sent: int = 0  # characters of detok.text already emitted


class Scheduler:
    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, image_cache: int = 8,
                 log: Callable[[str], None] | None = None):
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.images = ImageCache(size=image_cache)
        self.vision_computed = self.vision_cached = 0
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._running = 0
        self.peak_running = 0  # the largest batch so far (health)
        self._thread = threading.Thread(target=self._loop, name="parrot-scheduler", daemon=True)

    # ------------------------------------------------------------------ the server's side
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finishes the current step, then answers every job left with a 503."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if len(self._pending) >= self.max_queue:
                raise APIError(503, f"the server is busy ({len(self._pending)} requests waiting); retry later",
                               code="queue_full")
            self._pending.append(job)
            self._cv.notify_all()

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return self._running

    # ------------------------------------------------------------------ the model's thread
    def _loop(self) -> None:
        batch = self.model.new_decode_batch()
        rows: dict[int, _Row] = {}
        while True:
            with self._cv:
                while not self._stopping and not self._pending and not rows:
                    self._cv.wait()
                if self._stopping:
                    break
                joining = []
                while self._pending and len(rows) + len(joining) < self.max_batch:
                    joining.append(self._pending.popleft())
            for job in joining:
                if not job.cancelled:
                    self._join(batch, rows, job)
            for key in [k for k, r in rows.items() if r.job.cancelled]:
                batch.remove(key)
                del rows[key]
            self._running = len(rows)
            self.peak_running = max(self.peak_running, len(rows))
            if not rows:
                continue
            try:
                step = batch.step()
            except Exception as e:  # never leave a client hanging: fail the batch, keep serving
                self._crash(e, [r.job for r in rows.values()])
                rows.clear()
                batch = self.model.new_decode_batch()
                continue
            for key, token in step:
                self._token(batch, rows, key, token)
            self._running = len(rows)
        with self._cv:
            left = [r.job for r in rows.values()] + list(self._pending)
            self._pending.clear()
        for job in left:
            job.emit("error", APIError(503, "the server is shutting down", code="shutting_down"))

    def _join(self, batch, rows: dict[int, _Row], job: Job) -> None:
        try:
            feats = experts = None
            if job.pixels is not None:
                enc, computed = self.images.get(self.model, job.pixels)
                self.vision_computed += computed
                self.vision_cached += not computed
                feats, experts = enc.features, enc.experts
            embeds = self.model.embed_prompt(job.ids, feats, experts)
            job.prompt_tokens = int(embeds.shape[1])
            key, first = batch.add(embeds, job.params)
        except ParrotError as e:
            job.emit("error", APIError(400, str(e)))
            return
        except Exception as e:
            self._crash(e, [job])
            return
        rows[key] = _Row(job, StreamingDetokenizer(self.model.tokenizer))
        self._token(batch, rows, key, first)

    def _token(self, batch, rows: dict[int, _Row], key: int, token: int) -> None:
        row = rows[key]
        job = row.job
        if token in self.model.stop_ids:
            self._finish(batch, rows, key, "stop")
            return
        job.completion_tokens += 1
        row.detok.add(token)
        if self._emit_text(row, final=False):
            self._finish(batch, rows, key, "stop", flush=False)
        elif job.completion_tokens >= job.params.max_tokens:
            self._finish(batch, rows, key, "length")

    def _emit_text(self, row: _Row, final: bool) -> bool:
        """Emits the new text, holding back what could be the start of a stop string; True when a stop
        string appeared (the text is cut before it)."""
        text, job = row.detok.text, row.job
        end, hit = len(text), False
        for s in job.stop:
            i = text.find(s, max(0, row.sent - len(s) + 1))
            if i >= 0 and i < end:
                end, hit = i, True
        if not hit and not final:
            for s in job.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        end = min(end, len(text) - k)
                        break
        if end > row.sent:
            job.emit("delta", text[row.sent:end])
            row.sent = end
        job.text = text[:row.sent]
        return hit

    def _finish(self, batch, rows: dict[int, _Row], key: int, reason: str, flush: bool = True) -> None:
        row = rows.pop(key)
        batch.remove(key)
        if flush:
            row.detok.finalize()
            if self._emit_text(row, final=True):
                reason = "stop"
        row.job.finish_reason = reason
        row.job.emit("done", None)

    def _crash(self, e: Exception, jobs: list[Job]) -> None:
        self.log("".join(traceback.format_exception(e)).rstrip())
        for job in jobs:
            job.emit("error", APIError(500, f"internal error while generating ({type(e).__name__}: {e})"))
