"""`parrot.load(..., backend="cpu" | "cuda")`: the torch model behind the common interface."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from parrot.adapter import Adapter
from parrot.api import ParrotModel
from parrot.checkpoint import Checkpoint
from parrot.generation import SamplingParams, process_peak_rss

from .batch import generate_tokens_batch
from .generate import generate_tokens
from .loading import TORCH_DTYPES, load_torch_model


class TorchParrot(ParrotModel):
    def __init__(self, checkpoint: Checkpoint, dtype: str, device: str = "cpu", adapter: Adapter | None = None):
        super().__init__(checkpoint, dtype)
        self.backend = device
        self.device = torch.device(device)
        self.torch_dtype = TORCH_DTYPES[dtype]
        self.model = load_torch_model(checkpoint, device, dtype, adapter=adapter)
        self.adapter = adapter

    def pixels_to_torch(self, pixels: np.ndarray | None) -> torch.Tensor | None:
        if pixels is None:
            return None
        return torch.from_numpy(np.asarray(pixels, dtype=np.float32)).to(self.device, self.torch_dtype)

    @torch.inference_mode()
    def _logits(self, input_ids: list[int], pixels: np.ndarray | None) -> np.ndarray:
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        logits, _ = self.model(ids, pixel_values=self.pixels_to_torch(pixels))
        return logits[0].float().cpu().numpy()

    @torch.inference_mode()
    def batch_logits(self, batch: list[tuple[list[int], np.ndarray | None]], padding_side: str = "right"):
        """Logits of several prompts in one padded forward; returns one [T_i, V] array per prompt."""
        T = max(len(ids) for ids, _ in batch)
        pad = self.tokenizer.pad_id
        ids = torch.full((len(batch), T), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.bool)
        for i, (row, _) in enumerate(batch):
            if padding_side == "left":
                ids[i, T - len(row):], mask[i, T - len(row):] = torch.tensor(row), True
            else:
                ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), True
        C, H, W = 3, self.image_settings.crop_height, self.image_settings.crop_width
        pix = np.zeros((len(batch), C, H, W), dtype=np.float32)
        for i, (_, p) in enumerate(batch):
            if p is not None:
                pix[i] = p[0]
        has_image = any(p is not None for _, p in batch)
        logits, s = self.model(
            ids.to(self.device), mask.to(self.device), self.pixels_to_torch(pix) if has_image else None,
            padding_side=padding_side,
        )
        out = []
        for i in range(len(batch)):
            keep = s.attention_mask[i]
            out.append(logits[i][keep].float().cpu().numpy())
        return out

    # ---------------------------------------------------------------- incremental decoding
    def new_cache(self):
        """An empty KV cache for `forward_embeddings`."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.model.config)

    @torch.inference_mode()
    def image_features(self, pixels: np.ndarray | None) -> torch.Tensor | None:
        """CLIP + projector output H_v [1, N, C] for preprocessed pixels (cacheable per image)."""
        px = self.pixels_to_torch(pixels)
        return None if px is None else self.model.encode_images(px)

    @torch.inference_mode()
    def expert_outputs(self, image_features: torch.Tensor | None) -> torch.Tensor | None:
        """The MoE experts' outputs for H_v (they do not depend on the text): cacheable per image."""
        return None if image_features is None else self.model.expert_outputs(image_features)

    @torch.inference_mode()
    def embed_prompt(
        self, input_ids: list[int], image_features: torch.Tensor | None, experts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[1, T', C] prompt embeddings: the visual tokens computed once, from the prompt's text."""
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        return self.model.splice(ids, image_features=image_features, expert_outputs=experts).inputs_embeds

    @torch.inference_mode()
    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        return self.model.model.embed_tokens(torch.tensor([ids], dtype=torch.long, device=self.device))

    @torch.inference_mode()
    def forward_embeddings(self, embeds: torch.Tensor, cache=None, last_only: bool = False) -> torch.Tensor:
        """float32 logits [1, T, V] for embeddings that continue what `cache` holds (None: no cache);
        last_only: only the last position's [1, 1, V]."""
        offset = cache.get_seq_length() if cache is not None else 0
        T = embeds.shape[1]
        pos = torch.arange(offset, offset + T, device=self.device)[None]
        mask = torch.ones((1, offset + T), dtype=torch.bool, device=self.device)
        h = self.model.decoder(embeds, mask, pos, cache=cache)
        return self.model.lm_head(h[:, -1:] if last_only else h).float()

    def cache_length(self, cache) -> int:
        return cache.get_seq_length()

    def trim_cache(self, cache, n: int) -> None:
        """Drops the last n positions."""
        if n > 0:
            cache.crop(-n)  # a negative count removes that many (transformers 4.4x and 5.x alike)

    # ---------------------------------------------------------------- generation
    def generate_tokens(self, embeds: torch.Tensor, cache, params: SamplingParams) -> Iterator[int]:
        return generate_tokens(self, embeds, cache, params)

    def generate_tokens_batch(
        self, embeds: list[torch.Tensor], params: list[SamplingParams], stop: frozenset[int]
    ) -> Iterator[list[tuple[int, int]]]:
        """Several prompts decoded together; per step, (request index, token) of the rows still running."""
        return generate_tokens_batch(self, embeds, params, stop)

    def evaluate(self, *arrays) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> int:
        """Bytes: cuda max_memory_allocated since the last reset; cpu: the process's peak RSS."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return process_peak_rss()
