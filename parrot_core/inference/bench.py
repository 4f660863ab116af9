"""`parrot bench`: prompt and generation speed, time to first token and peak memory, in mlx-lm's format.

Each trial answers a synthetic prompt: `prompt_tokens` random text tokens (seeded, no special
tokens) after the image placeholder, so the model sees the visual tokens plus that text. The
stop token is ignored, so every trial generates exactly `gen_tokens` tokens (as mlx-lm's
benchmark). The image is preprocessed once; the vision work is redone in every trial (nothing is
cached between trials), so the time to first token is CLIP + projector + MoE + prefill.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..constants import IMAGE_TOKEN_INDEX
from ..errors import ParrotError
from .batch import Request, generate_batch
from .generation import GenerationResult, SamplingParams, generate_stream

REPORT_KEYS = ("prompt_tps", "generation_tps", "time_to_first_token", "peak_memory")


@dataclass
class Trial:
    result: GenerationResult  # batch_size > 1: the first row's (its speed figures are the batch's)
    total_time: float  # seconds for the whole call


def synthetic_image(model, seed: int = 0):
    """Random pixels at the model's crop size (a PIL image)."""
    from PIL import Image

    s = model.image_settings
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((s.crop_height, s.crop_width, 3)) * 255).astype(np.uint8))


def synthetic_prompt(model, text_tokens: int, with_image: bool, seed: int = 0) -> list[int]:
    """`text_tokens` random ordinary token ids (seeded), after the image placeholder when with_image."""
    tok = model.tokenizer
    special = tok.special_ids()
    pool = np.array([i for i in range(min(tok.vocab_size, model.config.vocab_size)) if i not in special])
    ids = np.random.default_rng(seed).choice(pool, size=text_tokens).tolist()
    return [IMAGE_TOKEN_INDEX, *ids] if with_image else ids


def run_benchmark(
    model,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    image=None,
    num_trials: int = 3,
    batch_size: int = 1,
    warmup: bool = True,
    on_trial: Callable[[int, Trial], None] | None = None,
) -> list[Trial]:
    """Times `num_trials` generations (after one warmup). image: a path or PIL image; None: a
    synthetic image at the model's crop size; False: text only."""
    for name, v, low in (("prompt tokens", prompt_tokens, 1), ("generation tokens", gen_tokens, 1),
                         ("number of trials", num_trials, 1), ("batch size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ParrotError(f"{name} must be an integer >= {low} (got {v!r})")
    if image is None:
        image = synthetic_image(model)
    pixels = None if image is False else model.preprocess(image if not isinstance(image, str) else Path(image))
    params = SamplingParams(max_tokens=gen_tokens)
    prompts = [synthetic_prompt(model, prompt_tokens, pixels is not None, seed=i) for i in range(batch_size)]
    no_stop: frozenset[int] = frozenset()

    def once() -> GenerationResult:
        if batch_size == 1:  # a fresh image cache: the vision work is timed in every trial
            return generate_stream(model, prompts[0], pixels, params, stop=no_stop).consume()
        requests = [Request("", pixels, params, input_ids=ids) for ids in prompts]
        return generate_batch(model, requests, stop=no_stop)[0]

    if warmup:
        once()
    trials = []
    for i in range(num_trials):
        tic = time.perf_counter()
        result = once()
        trials.append(Trial(result, time.perf_counter() - tic))
        if on_trial is not None:
            on_trial(i, trials[-1])
    return trials


def format_trial(i: int, trial: Trial) -> str:
    """mlx-lm's benchmark line, with the time to first token added."""
    values = [f"{k}={getattr(trial.result, k):.3f}" for k in REPORT_KEYS]
    return f"Trial {i + 1}:  " + ", ".join([*values, f"total_time={trial.total_time:.3f}"])


def format_averages(trials: list[Trial]) -> str:
    avg = {k: sum(getattr(t.result, k) for t in trials) / len(trials) for k in REPORT_KEYS}
    return "Averages: " + ", ".join(f"{k}={v:.3f}" for k, v in avg.items())
