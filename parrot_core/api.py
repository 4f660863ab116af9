"""`parrot.load` and `ParrotModel`, the loaded model: the user-facing methods (logits, generate,
stream, generate_batch, chat), written once on top of the backend contract (parrot.contract)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import registry
from .constants import IMAGE_TOKEN_INDEX
from .contract import ModelBackend
from .errors import ParrotError
from .inference.batch import Request, generate_many
from .inference.chat import ChatSession
from .inference.generation import (
    GenerationResult,
    ImageCache,
    SamplingParams,
    TextStream,
    generate_stream,
    stop_token_ids,
)
from .model.checkpoint import Checkpoint
from .model.config import DTYPES
from .model.image import preprocess
from .model.prompt import build_inference_ids, check_image_placeholder
from .model.splice import plan_prompts
from .model.tokenizer import Tokenizer
from .storage.hub import resolve_model_path
from .training.adapter import Adapter, fit_base, read_adapter

BACKENDS = registry.NAMES


class ParrotModel(ModelBackend):
    """A loaded Parrot model. A backend subclasses it and implements the contract (parrot.contract);
    `backend` is the registry name it was loaded as."""

    def __init__(self, checkpoint: Checkpoint, dtype: str, spec: registry.BackendSpec):
        self.spec = spec
        self.backend = spec.name
        self.checkpoint = checkpoint
        self.path = checkpoint.path
        self.config = checkpoint.config
        self.vision_config = checkpoint.tower.config
        self.image_settings = checkpoint.tower.image
        self.dtype = dtype
        self._tokenizer: Tokenizer | None = None
        self._stop_ids: frozenset[int] | None = None
        self._images = ImageCache(size=2)  # vision outputs of the last images (generate / stream)
        self.adapter: Adapter | None = None  # the LoRA adapter applied at load, if any

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_dir(self.path)
        return self._tokenizer

    @property
    def stop_ids(self) -> frozenset[int]:
        """Token ids that end an answer: <|im_end|> (+ generation_config.json's eos_token_id)."""
        if self._stop_ids is None:
            self._stop_ids = stop_token_ids(self.path, self.tokenizer)
        return self._stop_ids

    @property
    def num_visual_tokens(self) -> int:
        return self.config.num_visual_tokens(self.vision_config)

    def preprocess(self, image) -> np.ndarray:
        """float32 [1, 3, H, W] pixels for a path, bytes or PIL image (official pipeline)."""
        return preprocess(image, self.image_settings)

    def encode_prompt(self, prompt: str, has_image: bool, system: str | None = None,
                      history: list[tuple[str, str]] | None = None) -> list[int]:
        """Token ids of the ChatML prompt, with -200 where the image goes."""
        return build_inference_ids(self.tokenizer, prompt, has_image, system, history)

    def logits(self, input_ids: list[int], pixels: np.ndarray | None = None) -> np.ndarray:
        """float32 [T, vocab] logits; T counts the visual tokens spliced in at the placeholder.

        The MoE's text context is every text token of `input_ids` (official inference semantics).
        """
        check_image_placeholder(input_ids, pixels is not None)
        bad = [i for i in input_ids if i != IMAGE_TOKEN_INDEX and not 0 <= i < self.config.vocab_size]
        if bad:
            raise ParrotError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return self._logits(list(input_ids), pixels)

    def _logits(self, input_ids: list[int], pixels: np.ndarray | None) -> np.ndarray:
        feats = None if pixels is None else self.image_features(pixels)
        return self.to_numpy(self.forward_embeddings(self.embed_prompt(input_ids, feats)))[0]

    def plan_prompt(self, input_ids: list[int], has_image: bool):
        """The splice plan of one prompt (parrot.model.splice), for `embed_prompt`."""
        return plan_prompts([input_ids], self.num_visual_tokens if has_image else 0)

    def plan_batch(self, batch, padding_side: str = "right"):
        """For `batch_logits`: the splice plan of (ids, pixels or None) prompts, and the vision features of
        those with an image (the rows of `plan.image_rows`)."""
        with_image = [i for i, (_, p) in enumerate(batch) if p is not None]
        plan = plan_prompts([list(ids) for ids, _ in batch], self.num_visual_tokens if with_image else 0,
                            padding_side)
        feats = self.image_features(np.concatenate([batch[i][1] for i in with_image])) if with_image else None
        return plan, feats

    # ------------------------------------------------------------------ generation
    def stream(
        self, prompt: str, image=None, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
        seed: int | None = None, system: str | None = None, history: list[tuple[str, str]] | None = None,
    ) -> TextStream:
        """Yields the answer's text pieces as they are produced; `.result` holds the figures once done.

        prompt: the user's message (the ChatML template is applied: system prompt, `<image>\n` first
        when there is an image, assistant header). image: a path, a PIL image or None (text only).
        Greedy when temperature is 0, else temperature + top-p sampling seeded by `seed`. Stops at
        <|im_end|> or after max_tokens. history: earlier (user, assistant) turns.
        """
        params = SamplingParams(max_tokens, temperature, top_p, seed)
        if not isinstance(prompt, str):
            raise ParrotError(f"prompt must be a string (got {type(prompt).__name__})")
        ids = self.encode_prompt(prompt, image is not None, system, history)
        return generate_stream(self, ids, image, params, images=self._images)

    def generate(
        self, prompt: str, image=None, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
        seed: int | None = None, system: str | None = None, history: list[tuple[str, str]] | None = None,
    ) -> GenerationResult:
        """The whole answer: `.text`, `.tokens` (new ids, without the stop token) and timing figures."""
        return self.stream(prompt, image, max_tokens, temperature, top_p, seed, system, history).consume()

    def generate_batch(
        self, prompts: Sequence[str], images: Sequence | None = None, max_tokens: int = 256,
        temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, system: str | None = None,
        batch_size: int = 8,
    ) -> list[GenerationResult]:
        """Answers of several prompts (`images[i]` goes with `prompts[i]`; None: text only), decoded
        `batch_size` at a time (batched prefill and decode). Per-request settings: `parrot.inference.batch`."""
        images = [None] * len(prompts) if images is None else list(images)
        if len(images) != len(prompts):
            raise ParrotError(f"got {len(prompts)} prompts but {len(images)} images")
        params = SamplingParams(max_tokens, temperature, top_p, seed)
        requests = [Request(p, im, params, system) for p, im in zip(prompts, images)]
        return list(generate_many(self, requests, batch_size, self._images))

    def chat(self, image=None, system: str | None = None) -> ChatSession:
        """A multi-turn conversation about one image (or none) that reuses its caches between turns."""
        return ChatSession(self, image, system)


def load(
    path: str | Path,
    backend: str | None = None,
    dtype: str | None = None,
    vision_tower: str | Path | None = None,
    adapter: str | Path | None = None,
) -> ParrotModel:
    """Loads an official-layout or MLX-layout Parrot directory (or a hub id, when online).

    backend: "mlx", "cpu" or "cuda" (parrot.registry); None chooses as the CLI does
    (`parrot.registry.default_backend`: mlx on Apple silicon, else cuda when a GPU is visible, else
    cpu). dtype: float32 / float16 / bfloat16; None keeps the checkpoint's torch_dtype.
    vision_tower: a CLIP directory or known id when `mm_vision_tower` does not resolve, or when the
    checkpoint lacks the tower's weights. adapter: a LoRA adapter
    directory (`parrot train --lora`'s output) trained on this base: applied as LoRA layers on MLX
    (a quantized base stays quantized), merged into the weights at load on torch.
    """
    backend = backend or registry.default_backend()
    spec = registry.require(backend)
    if dtype is not None and dtype not in DTYPES:
        raise ParrotError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    ckpt = Checkpoint.open(resolve_model_path(path), vision_tower)
    dtype = dtype or ckpt.config.torch_dtype
    lora = None
    if adapter is not None:
        lora = read_adapter(adapter)
        fit_base(lora, ckpt.config, ckpt.manifest.required, str(ckpt.path))
    return spec.load("model")(ckpt, dtype, spec, adapter=lora)
