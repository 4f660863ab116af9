"""Generation, backend-agnostic: sampling settings, the result, the text stream, KV-cache reuse.

A backend supplies the array work (ParrotModel's incremental methods: `image_features`,
`expert_outputs`, `embed_prompt`, `new_cache`, `cache_length`, `trim_cache`, `generate_tokens`,
`peak_memory`); `generate_stream` here orders it:

  image -> CLIP + projector (+ the MoE experts' outputs, which do not depend on the text): once
  per image, cached by pixel hash
  prompt ids -> embeddings; the visual tokens MoE(H_v) are computed once, from the prompt's text
  reuse the KV cache for the longest prefix the previous call left in it, prefill the rest
  decode with the KV cache until <|im_end|> or max_tokens, detokenizing as tokens arrive
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import IMAGE_TOKEN_INDEX
from ..errors import ParrotError
from ..model.prompt import check_image_placeholder
from .detokenizer import StreamingDetokenizer


@dataclass(frozen=True)
class SamplingParams:
    """max_tokens >= 1; temperature 0 is greedy; top_p in (0, 1] (1: no nucleus filter); seed for sampling."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        self.check(self.max_tokens, self.temperature, self.top_p, self.seed)

    @staticmethod
    def check(max_tokens: Any, temperature: Any, top_p: Any, seed: Any, names: dict[str, str] | None = None) -> None:
        """Raises ParrotError for a bad value, naming it as `names` says (the CLI passes its flags:
        {"max_tokens": "--max-tokens", ...}); the Python parameter names otherwise."""
        n = {k: k for k in ("max_tokens", "temperature", "top_p", "seed")} | (names or {})
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ParrotError(f"{n['max_tokens']} must be an integer >= 1 (got {max_tokens!r})")
        if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
            raise ParrotError(f"{n['temperature']} must be a finite number >= 0; 0 means greedy (got {temperature!r})")
        if not _is_real(top_p) or not 0 < top_p <= 1:
            raise ParrotError(f"{n['top_p']} must be in (0, 1]; 1 keeps every token (got {top_p!r})")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ParrotError(f"{n['seed']} must be a non-negative integer (got {seed!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_seed(self) -> SamplingParams:
        """A concrete seed (drawn at random when None) so every sampled answer can be reproduced."""
        if self.seed is not None or self.greedy:
            return self
        return SamplingParams(self.max_tokens, self.temperature, self.top_p, random.SystemRandom().getrandbits(31))


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def process_peak_rss() -> int:
    """This process's peak resident memory in bytes (0 where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; Linux: KiB


@dataclass
class GenerationResult:
    """One answer and its figures. Times in seconds, memory in GB (1e9 bytes)."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)  # generated ids, without the stop token
    finish_reason: str | None = None  # "stop" (<|im_end|>), "length" (max_tokens); None if interrupted
    prompt_tokens: int = 0  # prompt length with the visual tokens spliced in
    prefill_tokens: int = 0  # positions computed this call (the rest came from the KV cache)
    prompt_tps: float = 0.0  # prefill_tokens / prefill time (after vision, up to the first token)
    generation_tokens: int = 0  # tokens sampled, the stop token included (mlx-lm's count)
    generation_tps: float = 0.0  # tokens after the first / time from the first token to the last
    time_to_first_token: float = 0.0  # from the call: image preprocessing + vision + prefill
    vision_time: float = 0.0  # CLIP + projector + experts (0 when cached or text only)
    peak_memory: float = 0.0  # GB; MLX: mx.get_peak_memory; cuda: max_memory_allocated; cpu: process peak RSS
    seed: int | None = None  # the seed sampling used (None when greedy)

    def summary(self) -> str:
        """mlx-lm's report lines."""
        return (
            f"Prompt: {self.prompt_tokens} tokens ({self.prefill_tokens} computed), "
            f"{self.prompt_tps:.3f} tokens-per-sec\n"
            f"Generation: {self.generation_tokens} tokens, {self.generation_tps:.3f} tokens-per-sec\n"
            f"Time to first token: {self.time_to_first_token:.3f} s (vision {self.vision_time:.3f} s)\n"
            f"Peak memory: {self.peak_memory:.3f} GB"
        )


class TextStream:
    """Iterates over the answer's text pieces as they are produced; `.result` fills in as it goes
    and is complete once the stream is exhausted."""

    def __init__(self, pieces: Iterator[str], result: GenerationResult):
        self._pieces = pieces
        self.result = result

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stops generating early (the KV cache stays consistent)."""
        self._pieces.close()

    def consume(self, on_piece: Callable[[str], None] | None = None) -> GenerationResult:
        for piece in self:
            if on_piece is not None:
                on_piece(piece)
        return self.result


def stop_token_ids(model_dir: str | Path, tokenizer) -> frozenset[int]:
    """<|im_end|> only, as the official runner (it passes `eos_token_id=<|im_end|>` to generate, which
    overrides generation_config.json: Qwen's lists <|endoftext|> there too, and the official code does
    not stop at it)."""
    return frozenset({tokenizer.eos_id})


# ---------------------------------------------------------------------------------------- images
@dataclass
class ImageEncoding:
    """CLIP + projector output H_v and the MoE experts' outputs (backend arrays), for one image."""

    key: str
    features: Any
    experts: Any


def pixel_key(pixels: np.ndarray) -> str:
    a = np.ascontiguousarray(pixels, dtype=np.float32)
    return hashlib.sha1(a.tobytes() + str(a.shape).encode()).hexdigest()


class ImageCache:
    """A few recent ImageEncodings by pixel hash, so an image's vision work is done once."""

    def __init__(self, size: int = 2):
        self.size = size
        self._items: OrderedDict[str, ImageEncoding] = OrderedDict()

    def get(self, model, pixels: np.ndarray) -> tuple[ImageEncoding, bool]:
        """(encoding, computed now?)"""
        key = pixel_key(pixels)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key], False
        feats = model.image_features(pixels)
        enc = ImageEncoding(key, feats, model.expert_outputs(feats))
        model.evaluate(enc.features, enc.experts)
        self._items[key] = enc
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return enc, True

    def get_many(self, model, pixels: Sequence[np.ndarray]) -> list[tuple[ImageEncoding, bool]]:
        """`get` for several images ([1, 3, H, W] each): the ones not cached go through CLIP, the projector and
        the experts together, as one batch (one pass over the weights instead of one per image)."""
        keys = [pixel_key(p) for p in pixels]
        todo = list(dict.fromkeys(k for k in keys if k not in self._items))
        new: dict[str, ImageEncoding] = {}
        if todo:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            feats = model.image_features(np.concatenate([pixels[first[k]] for k in todo]))
            experts = model.expert_outputs(feats)
            model.evaluate(feats, experts)
            for j, k in enumerate(todo):
                new[k] = ImageEncoding(k, feats[j:j + 1], None if experts is None else experts[:, j:j + 1])
        out, seen = [], set()
        for k in keys:
            if k in new:
                out.append((new[k], k not in seen))  # a repeated image counts as computed once
                seen.add(k)
                self._items[k] = new[k]
            else:
                self._items.move_to_end(k)
                out.append((self._items[k], False))
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return out

    def clear(self) -> None:
        self._items.clear()


# ---------------------------------------------------------------------------------------- KV reuse
class KVState:
    """A backend KV cache and what each of its positions holds: a token id, or (visual key, j) for
    the j-th visual token, the visual key naming the image and the text its MoE attended to."""

    def __init__(self, model):
        self.model = model
        self.cache = model.new_cache()
        self.items: list = []

    def reset(self) -> None:
        self.cache = self.model.new_cache()
        self.items = []

    def reuse(self, items: list) -> int:
        """Trims the cache to the longest prefix it shares with `items` (leaving >= 1 position to
        compute, for the logits); returns the number of positions kept."""
        n = 0
        limit = min(len(self.items), len(items) - 1)
        while n < limit and self.items[n] == items[n]:
            n += 1
        if n == 0 or self.model.cache_length(self.cache) != len(self.items):
            self.reset()
            return 0
        self.model.trim_cache(self.cache, len(self.items) - n)
        self.items = self.items[:n]
        return n

    def commit(self, items: list, generated: list[int]) -> None:
        """After decoding: the cache holds `items` and the first k generated tokens (k from its length)."""
        k = self.model.cache_length(self.cache) - len(items)
        if 0 <= k <= len(generated):
            self.items = list(items) + list(generated[:k])
        else:
            self.reset()


def expand_items(input_ids: list[int], enc: ImageEncoding | None, num_visual: int) -> list:
    """One entry per position of the spliced prompt (see KVState)."""
    if enc is None or IMAGE_TOKEN_INDEX not in input_ids:
        return list(input_ids)
    vkey = (enc.key, tuple(i for i in input_ids if i != IMAGE_TOKEN_INDEX))
    p = input_ids.index(IMAGE_TOKEN_INDEX)
    return [*input_ids[:p], *((vkey, j) for j in range(num_visual)), *input_ids[p + 1:]]


# ---------------------------------------------------------------------------------------- the loop
def generate_stream(
    model,
    input_ids: list[int],
    image=None,
    params: SamplingParams | None = None,
    kv: KVState | None = None,
    images: ImageCache | None = None,
    stop: frozenset[int] | None = None,
) -> TextStream:
    """Streams the answer to a prompt (ids with at most one -200) about `image` (path, PIL image,
    float32 pixels [1, 3, H, W], or None). `kv` carries a KV cache across calls (chat sessions).
    `stop`: token ids that end the answer (default: the model's; an empty set generates max_tokens,
    for benchmarks). Bad settings and unusable images raise ParrotError here, before the stream starts."""
    t0 = time.perf_counter()
    params = (params or SamplingParams()).with_seed()
    check_image_placeholder(input_ids, image is not None)
    model.reset_peak_memory()
    pixels = None if image is None else image if isinstance(image, np.ndarray) else model.preprocess(image)
    result = GenerationResult(seed=None if params.greedy else params.seed)
    stop = model.stop_ids if stop is None else frozenset(stop)
    return TextStream(_run(model, list(input_ids), pixels, params, kv, images, stop, result, t0), result)


def _run(model, ids, pixels, params, kv, images, stop, result, t0) -> Iterator[str]:
    enc = None
    if pixels is not None:
        t_vis = time.perf_counter()
        enc, computed = (images or ImageCache(1)).get(model, pixels)
        result.vision_time = time.perf_counter() - t_vis if computed else 0.0
    embeds = model.embed_prompt(ids, None if enc is None else enc.features, None if enc is None else enc.experts)
    items = expand_items(ids, enc, model.num_visual_tokens)
    kv = kv or KVState(model)
    kept = kv.reuse(items)
    result.prompt_tokens, result.prefill_tokens = len(items), len(items) - kept
    t_prefill = time.perf_counter()
    detok = StreamingDetokenizer(model.tokenizer)
    generated: list[int] = []
    steps = model.generate_tokens(embeds[:, kept:], kv.cache, params)
    t_first = t_last = None
    try:
        for token in steps:
            t_last = time.perf_counter()
            if t_first is None:
                t_first = t_last
                result.time_to_first_token = t_first - t0
                result.prompt_tps = result.prefill_tokens / max(t_first - t_prefill, 1e-9)
            generated.append(token)
            if token in stop:
                result.finish_reason = "stop"
                break
            result.tokens.append(token)
            piece = detok.add(token)
            if piece:
                result.text = detok.text
                yield piece
            if len(result.tokens) >= params.max_tokens:
                result.finish_reason = "length"
                break
    except GeneratorExit:  # the consumer stopped between two tokens: the cache is consistent
        steps.close()
        kv.commit(items, generated)
        raise
    except BaseException:  # e.g. Ctrl-C inside a forward: the cache may be half-updated
        kv.reset()
        raise
    finally:
        result.generation_tokens = len(generated)
        if len(generated) > 1:
            result.generation_tps = (len(generated) - 1) / max(t_last - t_first, 1e-9)
        result.peak_memory = model.peak_memory() / 1e9
        result.text = detok.text
    steps.close()
    kv.commit(items, generated)
    tail = detok.finalize()
    result.text = detok.text
    if tail:
        yield tail


def advance_rows(rows: list[int], tokens: list[int], counts: list[int], params: list[SamplingParams],
                 stop: frozenset[int] | set[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """One decode step of a batch: counts each row's new token; returns the (row, token) pairs and the
    batch positions of the rows that go on (not at a stop token, not at their max_tokens)."""
    step, keep = [], []
    for j, (r, token) in enumerate(zip(rows, tokens)):
        counts[r] += 1
        step.append((r, token))
        if token not in stop and counts[r] < params[r].max_tokens:
            keep.append(j)
    return step, keep
