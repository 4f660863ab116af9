"""Image preprocessing exactly as the official pipeline (transformers 4.39's CLIPImageProcessor).

pad to square with the mean colour (centred) -> resize shortest edge (PIL bicubic on uint8) ->
centre crop -> x/255 (float64, then float32) -> (x - mean) / std in float32 -> CHW.
Done once here so both backends get identical pixels.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ParrotError
from .schema import PREPROCESSOR, check, parse_json, show

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_PIXELS = 89_478_485  # PIL's own bomb limit; larger images are refused
PREPROCESSOR_NAME = "preprocessor_config.json"
# what PIL raises for a damaged file (besides UnidentifiedImageError); some plugins raise
# NotImplementedError for variants they do not know (found by tests/test_fuzz_images.py)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, NotImplementedError)


@dataclass
class ImageSettings:
    crop_height: int = 336
    crop_width: int = 336
    shortest_edge: int = 336
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL bicubic
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    pad_to_square: bool = True  # config.image_aspect_ratio == "pad"

    @classmethod
    def clip_defaults(cls, image_size: int) -> ImageSettings:
        return cls(crop_height=image_size, crop_width=image_size, shortest_edge=image_size)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = PREPROCESSOR_NAME) -> ImageSettings:
        """CLIPImageProcessor settings, every field checked against `schema.PREPROCESSOR`."""
        check(d, PREPROCESSOR, source)
        crop = d.get("crop_size", 336)
        ch, cw = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        size = d.get("size", ch)
        if isinstance(size, dict):
            size = size.get("shortest_edge", size.get("height"))
            if size is None:
                raise ParrotError(f"{source}: size is {show(d['size'])}; expected an object with shortest_edge")
        return cls(
            crop_height=ch, crop_width=cw, shortest_edge=size,
            image_mean=tuple(float(x) for x in d.get("image_mean", CLIP_MEAN)),
            image_std=tuple(float(x) for x in d.get("image_std", CLIP_STD)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            resample=d.get("resample", 3),
            do_resize=d.get("do_resize", True),
            do_center_crop=d.get("do_center_crop", True),
            do_rescale=d.get("do_rescale", True),
            do_normalize=d.get("do_normalize", True),
        )

    @classmethod
    def from_file(cls, path: Path) -> ImageSettings:
        return cls.from_dict(parse_json(Path(path).read_bytes(), str(path)), str(path))

    def to_dict(self) -> dict[str, Any]:
        """CLIPImageProcessor's preprocessor_config.json."""
        d = asdict(self)
        for k in ("crop_height", "crop_width", "shortest_edge", "pad_to_square"):
            d.pop(k)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        d.update(
            crop_size={"height": self.crop_height, "width": self.crop_width},
            size={"shortest_edge": self.shortest_edge},
            do_convert_rgb=True,
            image_processor_type="CLIPImageProcessor",
        )
        return dict(sorted(d.items()))

    def save(self, directory: Path) -> None:
        Path(directory, PREPROCESSOR_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @property
    def background(self) -> tuple[int, int, int]:
        return tuple(int(x * 255) for x in self.image_mean)


def open_image(image: str | Path | Image.Image | bytes, settings: ImageSettings | None = None) -> Image.Image:
    """Opens and fully decodes an image as RGB; one clear ParrotError for anything unusable.

    With `settings`, an image whose preprocessing would allocate more than MAX_IMAGE_PIXELS pixels at any
    step (padding a thin image to a square, a huge upscale) is refused before it is decoded."""
    if isinstance(image, Image.Image):
        if settings is not None:
            check_sizes(image.size, settings, "<image>")
        return to_rgb(image)
    name = "<bytes>" if isinstance(image, bytes) else str(image)
    if not isinstance(image, bytes):
        p = Path(image)
        if not p.exists():
            raise ParrotError(f"{name}: image not found")
        if not p.is_file():
            raise ParrotError(f"{name}: not a file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS
        try:
            src = io.BytesIO(image) if isinstance(image, bytes) else name
            with Image.open(src) as im:
                if settings is not None:
                    check_sizes(im.size, settings, name)
                im.load()
                return to_rgb(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ParrotError(
                f"{name}: image too large (over {MAX_IMAGE_PIXELS:,} pixels); refusing it as a possible "
                "decompression bomb. Resize it first."
            ) from None
        except UnidentifiedImageError:
            raise ParrotError(f"{name}: not an image (PIL cannot identify the file)") from None
        except DECODE_ERRORS as e:
            raise ParrotError(f"{name}: truncated or corrupt image ({e})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB as the official pipeline converts (PIL's convert), except high-bit-depth grayscale, which PIL clips
    at 255: 16-bit (I;16*, or I holding values up to 65535) is scaled to 8 bits (v * 255 / 65535, rounded), F in
    [0, 1] is scaled by 255; values outside those ranges are mapped linearly from [min, max] to [0, 255]. I and F
    images already within [0, 255] convert as PIL does."""
    mode = im.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return im.convert("RGB")
    if mode.startswith("I;16"):
        return _gray8(_scale_16bit(np.asarray(im)))
    a = np.asarray(im)
    lo, hi = (a.min(), a.max()) if a.size else (0, 0)
    if lo >= 0 and hi <= 255 and (mode == "I" or hi > 1):
        return im.convert("RGB")
    if mode == "I" and lo >= 0 and hi <= 65535:
        return _gray8(_scale_16bit(a))
    if mode == "F" and lo >= 0 and hi <= 1:
        return _gray8(np.floor(a.astype(np.float64) * 255 + 0.5))
    span = float(hi) - float(lo)
    scaled = (a.astype(np.float64) - float(lo)) * (255 / span) if span > 0 else np.zeros(a.shape)
    return _gray8(np.floor(scaled + 0.5))


def _scale_16bit(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.int64) * 255 + 32767) // 65535  # round(v * 255 / 65535), exactly, in integers


def _gray8(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB")


def _resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """The shortest edge becomes `size`, the other keeps the aspect ratio (truncated, as CLIP's processor)."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (size, new_long) if w <= h else (new_long, size)


def check_sizes(size: tuple[int, int], settings: ImageSettings, name: str = "<image>") -> None:
    """Refuses an image that has no pixels, or whose preprocessing would hold more than MAX_IMAGE_PIXELS pixels
    at any step: the image, padded to a square, resized, cropped (so memory is bounded whatever its shape)."""
    w, h = size
    if w < 1 or h < 1:
        raise ParrotError(f"{name}: the image is empty ({w}x{h} pixels)")
    steps = [("holds", (w, h))]
    if settings.pad_to_square:
        w = h = max(w, h)
        steps.append(("pads to a square of", (w, h)))
    if settings.do_resize:
        w, h = _resized_size(w, h, settings.shortest_edge)
        steps.append(("is resized to", (w, h)))
    if settings.do_center_crop:
        steps.append(("is cropped within", (max(w, settings.crop_width), max(h, settings.crop_height))))
    for what, (sw, sh) in steps:
        if sw * sh > MAX_IMAGE_PIXELS:
            raise ParrotError(
                f"{name}: the {size[0]}x{size[1]} image {what} {sw}x{sh} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel "
                "limit (memory; a possible decompression bomb). Crop or resize it first."
            )


def expand_to_square(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    out = Image.new(im.mode, (side, side), background)
    out.paste(im, ((side - w) // 2, (side - h) // 2))
    return out


def _resize_shortest(im: Image.Image, size: int, resample: int) -> Image.Image:
    return im.resize(_resized_size(*im.size, size), resample=resample, reducing_gap=None)


def _center_crop(a: np.ndarray, ch: int, cw: int) -> np.ndarray:
    h, w = a.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return a[top:top + ch, left:left + cw]
    out = np.zeros((max(h, ch), max(w, cw), a.shape[2]), dtype=a.dtype)  # pad, then crop
    pt, pl = max(0, -top), max(0, -left)
    out[pt:pt + h, pl:pl + w] = a
    return _center_crop(out, ch, cw)


def preprocess(image: str | Path | Image.Image | bytes, settings: ImageSettings) -> np.ndarray:
    """float32 [1, 3, H, W] pixels, as the official pipeline computes them. Every step's size is checked
    against MAX_IMAGE_PIXELS before it is allocated (`check_sizes`)."""
    im = open_image(image, settings)
    if settings.pad_to_square:
        im = expand_to_square(im, settings.background)
    if settings.do_resize:
        im = _resize_shortest(im, settings.shortest_edge, settings.resample)
    a = np.asarray(im)
    if settings.do_center_crop:
        a = _center_crop(a, settings.crop_height, settings.crop_width)
    x = a.astype(np.float64) * settings.rescale_factor if settings.do_rescale else a
    x = np.asarray(x, dtype=np.float32)
    if settings.do_normalize:
        mean = np.array(settings.image_mean, dtype=np.float32)
        std = np.array(settings.image_std, dtype=np.float32)
        x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])
