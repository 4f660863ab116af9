"""Training data in the LLaVA JSON format, validated up front, formatted and collated in numpy.

`[{"id", "image": "rel/path.jpg", "conversations": [{"from": "human"|"gpt"|"system", "value"}]}]`,
images resolved against an image folder; samples without "image" are text-only. Every sample is
checked and tokenized once when the file is loaded (unusable ones are dropped with a reason, and
the kept ones' lengths after the visual tokens are spliced in are known); `item(i)` re-formats a
sample and decodes its image lazily (in the trainer's worker processes).

Formatting is the official one: `<image>` moved to the front of its message (image samples only),
then `parrot.model.prompt.format_conversation` (labels = the assistant turns after their header). Text-only
samples get an all-zeros image, as the official code feeds them, so the vision tower, projector and
MoE run for every sample (their output is not spliced in). Backend-agnostic: no torch, no mlx.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX, ROLE_HEADERS
from ..errors import ParrotError
from ..model.image import DECODE_ERRORS, ImageSettings, check_sizes, preprocess
from ..model.prompt import format_conversation, move_image_to_front
from ..model.schema import parse_json
from ..model.tokenizer import Tokenizer, is_text

log = logging.getLogger(__name__)

MALFORMED = "empty or malformed conversations"
NO_ANSWER = "no assistant (gpt) turn to learn from"
IMAGE_MISSING = "image not found"
IMAGE_UNREADABLE = "image unreadable (not an image)"
IMAGE_TOO_LARGE = "image too large (its pixels, or after padding to a square / resizing, exceed the limit)"
IMAGE_FAILURES = (IMAGE_MISSING, IMAGE_UNREADABLE, IMAGE_TOO_LARGE)
IMAGE_UNUSED = "image given but the conversation has no <image>"
PLACEHOLDER_NO_IMAGE = "<image> in the conversation but no image given"
MANY_IMAGES = "more than one <image>"
TOKENIZATION = "turn-by-turn tokenization differs from the whole prompt's"
TOO_LONG = "longer than --max-length after the visual tokens are counted"
NO_LABEL_LEFT = "no answer token within --max-length"


@dataclass
class Sample:
    index: int  # position in the JSON list
    id: str
    image: Path | None
    length: int  # tokens after the visual tokens are spliced in (and truncation)
    num_labels: int  # supervised next-token targets (after the shift and truncation)


@dataclass
class DataReport:
    path: str
    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # reason -> [{id, detail}]

    def drop(self, reason: str, sample_id: str, detail: str = "") -> None:
        self.dropped.setdefault(reason, []).append({"id": sample_id, "detail": detail})

    @property
    def num_dropped(self) -> int:
        return sum(len(v) for v in self.dropped.values())

    def summary(self) -> str:
        lines = [f"{self.path}: {self.kept} of {self.total} samples kept"
                 + (f", {self.truncated} truncated to --max-length" if self.truncated else "")]
        for reason, items in sorted(self.dropped.items(), key=lambda kv: -len(kv[1])):
            ids = ", ".join(repr(it["id"]) for it in items[:3]) + (", ..." if len(items) > 3 else "")
            lines.append(f"  dropped {len(items)}: {reason} ({ids})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "total": self.total, "kept": self.kept, "truncated": self.truncated,
                "dropped": self.dropped}


class _Drop(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def read_llava_json(path: str | Path) -> list:
    """The JSON list of samples; a ParrotError for a missing file, bad JSON or a non-list."""
    p = Path(path)
    if not p.is_file():
        raise ParrotError(f"{p}: training data file not found")
    try:
        raw = parse_json(p.read_bytes(), str(p))
    except ParrotError as e:
        raise ParrotError(f"{e}. Expected a LLaVA list of samples.") from None
    if not isinstance(raw, list):
        raise ParrotError(
            f"{p}: expected a JSON list of samples ([{{\"id\", \"image\", \"conversations\": [...]}}]), "
            f"got a {type(raw).__name__}"
        )
    return raw


def check_conversations(sample: Any) -> list[dict]:
    if not isinstance(sample, dict):
        raise _Drop(MALFORMED, f"sample is a {type(sample).__name__}, not an object")
    convs = sample.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise _Drop(MALFORMED, "'conversations' is missing, empty or not a list")
    for i, turn in enumerate(convs):
        if (not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or turn["from"] not in ROLE_HEADERS
                or not isinstance(turn.get("value"), str)):
            raise _Drop(MALFORMED, f"turn {i} needs 'from' (human, gpt or system) and a string 'value'")
        if not is_text(turn["value"]):
            raise _Drop(MALFORMED, f"turn {i}'s value is not valid Unicode text (a lone surrogate)")
    if not any(t["from"] == "gpt" for t in convs):
        raise _Drop(NO_ANSWER)
    return convs


def sample_conversations(sample: dict) -> list[dict]:
    """The turns as the official data pipeline hands them to the formatter (copies)."""
    convs = [dict(t) for t in sample["conversations"]]
    if "image" in sample:
        for t in convs:
            t["value"] = move_image_to_front(t["value"])
    return convs


def splice_labels(input_ids: Sequence[int], labels: Sequence[int], num_visual_tokens: int) -> list[int]:
    """Labels after the placeholder is replaced by the (ignored) visual tokens."""
    out: list[int] = []
    for t, lab in zip(input_ids, labels):
        if t == IMAGE_TOKEN_INDEX:
            out.extend([IGNORE_INDEX] * num_visual_tokens)
        else:
            out.append(lab)
    return out


def _check_image(path: Path, settings: ImageSettings) -> str | None:
    try:
        if not path.is_file():
            return IMAGE_MISSING
    except OSError:  # e.g. a name longer than the file system allows
        return IMAGE_MISSING
    try:
        with Image.open(path) as im:  # reads the header only; full decoding happens in the loader
            check_sizes(im.size, settings, str(path))
            return None
    except (ParrotError, Image.DecompressionBombError):
        return IMAGE_TOO_LARGE
    except DECODE_ERRORS:  # UnidentifiedImageError is an OSError
        return IMAGE_UNREADABLE


class LlavaData:
    """A validated LLaVA JSON dataset; `item(i)` gives the i-th kept sample, ready to collate."""

    def __init__(
        self,
        path: str | Path,
        image_dir: str | Path | None,
        tokenizer: Tokenizer,
        image_settings: ImageSettings,
        num_visual_tokens: int,
        max_length: int = 2048,
        truncate: bool = False,
        progress: bool = False,
    ):
        self.path = Path(path)
        self.image_dir = Path(image_dir) if image_dir is not None else self.path.parent
        if image_dir is not None and not self.image_dir.is_dir():
            what = "is not a directory" if self.image_dir.exists() else "not found"
            raise ParrotError(f"--image-dir {self.image_dir}: {what} (the folder the samples' images are relative to)")
        self.tokenizer = tokenizer
        self.image_settings = image_settings
        self.num_visual_tokens = num_visual_tokens
        self.max_length = max_length
        self.truncate = truncate
        self.raw = read_llava_json(self.path)
        self.report = DataReport(str(self.path), total=len(self.raw))
        self.samples: list[Sample] = []
        self._validate(progress)
        if not self.samples:
            raise ParrotError(f"no usable training sample.\n{self.report.summary()}")
        self._check_images_load()

    def _check_images_load(self) -> None:
        """When no image sample is kept because every image failed to load, the run would silently train
        text-only: an error naming the first failures (a wrong --image-dir, usually)."""
        failed = [(reason, it) for reason in IMAGE_FAILURES for it in self.report.dropped.get(reason, [])]
        if failed and not any(s.image is not None for s in self.samples):
            first = "; ".join(f"{it['id']!r}: {reason} ({it['detail']})" for reason, it in failed[:3])
            raise ParrotError(f"{self.path}: none of the {len(failed)} image samples has a usable image (first: "
                              f"{first}). Check --image-dir ({self.image_dir}): image paths are relative to it.")

    # ---------------------------------------------------------------- validation
    def _validate(self, progress: bool) -> None:
        paths = {}
        for s in self.raw:
            if isinstance(s, dict) and isinstance(s.get("image"), str):
                paths[s["image"]] = self.image_dir / s["image"]
        with ThreadPoolExecutor(8) as ex:  # header checks are I/O bound
            status = dict(zip(paths, ex.map(lambda p: _check_image(p, self.image_settings), paths.values())))
        it = enumerate(self.raw)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(self.raw), desc="checking data", unit="sample", leave=False)
        for index, raw in it:
            sid = str(raw.get("id", f"#{index}")) if isinstance(raw, dict) else f"#{index}"
            try:
                sample = self._check(index, sid, raw, status)
            except _Drop as d:
                self.report.drop(d.reason, sid, d.detail)
                continue
            self.samples.append(sample)
        self.report.kept = len(self.samples)

    def _check(self, index: int, sid: str, raw: Any, image_status: dict[str, str | None]) -> Sample:
        convs = check_conversations(raw)
        image = None
        if "image" in raw:
            if not isinstance(raw["image"], str) or not raw["image"]:
                raise _Drop(MALFORMED, "'image' must be a relative path string")
            bad = image_status[raw["image"]]
            if bad:
                raise _Drop(bad, str(self.image_dir / raw["image"]))
            image = self.image_dir / raw["image"]
        n_placeholders = sum(t["value"].count(DEFAULT_IMAGE_TOKEN) for t in convs)
        if image is None and n_placeholders:
            raise _Drop(PLACEHOLDER_NO_IMAGE)
        if image is not None and n_placeholders == 0:
            raise _Drop(IMAGE_UNUSED)
        if image is not None and sum(DEFAULT_IMAGE_TOKEN in t["value"] for t in convs) > 1:
            raise _Drop(MANY_IMAGES)
        ids, labels = self._format(raw)
        spliced = splice_labels(ids, labels, self.num_visual_tokens)
        if len(spliced) > self.max_length:
            if not self.truncate:
                raise _Drop(TOO_LONG, f"{len(spliced)} tokens")
            self.report.truncated += 1
        num_labels = sum(1 for lab in spliced[1:self.max_length] if lab != IGNORE_INDEX)
        if num_labels == 0:
            raise _Drop(NO_LABEL_LEFT)
        return Sample(index, sid, image, min(len(spliced), self.max_length), num_labels)

    def _format(self, raw: dict) -> tuple[list[int], list[int]]:
        try:
            f = format_conversation(self.tokenizer, sample_conversations(raw))
        except ParrotError as e:
            raise _Drop(TOKENIZATION, str(e)) from None
        ids, labels = f.input_ids, f.labels
        if self.truncate:  # the official collator cuts the text to max length before splicing too
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return ids, labels

    # ---------------------------------------------------------------- items
    def __len__(self) -> int:
        return len(self.samples)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return 3, self.image_settings.crop_height, self.image_settings.crop_width

    def pixels(self, i: int) -> np.ndarray:
        """float32 [3, H, W]: the sample's image, or zeros for a text-only sample (official)."""
        s = self.samples[i]
        if s.image is None:
            return np.zeros(self.image_shape, dtype=np.float32)
        try:
            return preprocess(s.image, self.image_settings)[0]
        except ParrotError as e:  # the header was fine but decoding failed: the official mean image
            log.warning("%s; training sample %r uses a mean-colour image instead", e, s.id)
            mean = Image.new("RGB", (self.image_shape[2], self.image_shape[1]), self.image_settings.background)
            return preprocess(mean, self.image_settings)[0]

    def item(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        ids, labels = self._format(self.raw[s.index])
        return {"input_ids": np.asarray(ids, dtype=np.int64), "labels": np.asarray(labels, dtype=np.int64),
                "pixel_values": self.pixels(i), "has_image": s.image is not None, "length": s.length,
                "num_labels": s.num_labels}


def collate(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """A right-padded micro-batch: input_ids / labels / attention_mask [B, T], pixel_values [B, 3, H, W].

    Also `num_label_tokens` (supervised targets after splicing), `num_tokens` (valid spliced tokens)
    and `padded_tokens` (B x the spliced batch length), which the trainer logs.
    """
    B, T = len(items), max(len(it["input_ids"]) for it in items)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((B, T), dtype=bool)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = it["input_ids"], it["labels"], True
    lengths = [it["length"] for it in items]
    return {
        "input_ids": ids, "labels": labels, "attention_mask": mask,
        "pixel_values": np.stack([it["pixel_values"] for it in items]),
        "has_image": np.asarray([it["has_image"] for it in items]),
        "num_label_tokens": int(sum(it["num_labels"] for it in items)),
        "num_tokens": int(sum(lengths)), "padded_tokens": B * max(lengths),
    }

