"""Multi-turn chat about one image: history, image switching, and the caches kept between turns.

Parrot's MoE attends over all the prompt's text, so the visual tokens change whenever the
conversation grows (the official semantics, kept here). What each turn costs:

- CLIP + projector, and the experts' outputs E_i(H_v) (they do not depend on the text): once per
  image, cached by pixel hash;
- MoE routing (one attention of the CLS token over the prompt's word embeddings) and the weighted
  sum of the cached expert outputs: every turn, cheap;
- the LLM: the KV cache of the positions before the image placeholder (system prompt and
  `<|im_start|>user\\n`) is reused; the visual tokens and all the text after them (earlier turns,
  the new question) are prefilled again, then the answer is decoded with the KV cache;
- text-only sessions have no visual tokens: the previous turn's cache (prompt and answer) is
  reused and only the new user turn is prefilled.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .generation import ImageCache, KVState, SamplingParams, TextStream, generate_stream


class ChatSession:
    """`ask` streams an answer and adds the turn to `history`; `set_image` switches image (a new
    conversation: Parrot sees one image, in the first user turn); `clear` forgets the history."""

    def __init__(self, model, image=None, system: str | None = None):
        self.model = model
        self.system = system
        self.history: list[tuple[str, str]] = []
        self.images = ImageCache(size=4)
        self.kv: KVState | None = None
        self.pixels = None
        self.image_name: str | None = None
        if image is not None:
            self.set_image(image)

    def set_image(self, image) -> None:
        """A path, a PIL image, or None (text only). Bad images raise ParrotError and change nothing."""
        self.pixels = None if image is None else self.model.preprocess(image)
        self.image_name = None if image is None else (str(image) if isinstance(image, (str, Path)) else "<image>")
        self.history.clear()

    def clear(self) -> None:
        self.history.clear()

    def ask(
        self, prompt: str, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
        seed: int | None = None,
    ) -> TextStream:
        params = SamplingParams(max_tokens, temperature, top_p, seed)
        ids = self.model.encode_prompt(prompt, self.pixels is not None, self.system, self.history)
        if self.kv is None:
            self.kv = KVState(self.model)
        stream = generate_stream(self.model, ids, self.pixels, params, self.kv, self.images)
        return TextStream(self._record(prompt, stream), stream.result)

    def _record(self, prompt: str, stream: TextStream) -> Iterator[str]:
        yield from stream
        if stream.result.finish_reason is not None:  # an interrupted answer is not kept
            self.history.append((prompt, stream.result.text.strip()))
