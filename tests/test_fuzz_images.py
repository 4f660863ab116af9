"""Fuzzing image decoding: damaged PNG (RGB, 16-bit grey, palette), JPEG, GIF (animated), BMP, TIFF
(raw, LZW), WebP and DDS bytes through `open_image`, then `preprocess`. Whatever the bytes, the result is
finite pixels of the model's size or a ParrotError (see tests/fuzz.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fuzz import FUZZ, NOTES, cases, mutate_bytes, only_parrot_errors
from hypothesis import given
from PIL import Image

from parrot.errors import ParrotError
from parrot.model.image import ImageSettings, open_image, preprocess

SETTINGS = ImageSettings.clip_defaults(30)
# Decoded giants (a 7 x 43866 GIF pads to a 43866-pixel square) are refused by preprocess before any
# allocation (tests/test_image_limits.py); images whose padded square stays under the limit (up to 89.5 M
# pixels) are legitimate but take seconds to transform: to keep this test fast they are decoded here, not
# transformed. The count says how many.
MAX_TRANSFORMED_SIDE = 4096


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, format=fmt, **kw)
    return b.getvalue()


@pytest.fixture(scope="module")
def seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((5, 7, 3)) * 255).astype(np.uint8))
    grey16 = Image.fromarray((rng.random((5, 7)) * 65535).astype(np.uint16))
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    return [
        _encode(rgb, "PNG"), _encode(grey16, "PNG"), _encode(rgb.convert("P"), "PNG"), _encode(rgb, "JPEG"),
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), _encode(rgb, "BMP"),
        _encode(rgb, "TIFF"), _encode(rgb, "TIFF", compression="tiff_lzw"), _encode(rgb, "WEBP"), _encode(rgb, "DDS"),
    ]


def decode_and_preprocess(data: bytes) -> bool:
    im = open_image(data)
    assert im.mode == "RGB" and min(im.size) >= 1
    if max(im.size) > MAX_TRANSFORMED_SIDE:
        return False
    x = preprocess(im, SETTINGS)
    assert x.shape == (1, 3, 30, 30) and x.dtype == np.float32 and np.isfinite(x).all()
    return True


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on damaged TIFF tags
@FUZZ(2500)
@given(r=cases())
def test_image_bytes_raise_only_parrot_errors(seeds, r):
    data = mutate_bytes(r, r.choice(seeds), protect=r.choice([0, 4, 8, 16]))
    if only_parrot_errors("image bytes (open_image + preprocess)", decode_and_preprocess, data) is False:
        NOTES["image bytes: decoded images too large to transform here (MAX_TRANSFORMED_SIDE)"] += 1


def test_unknown_dds_variant_is_a_clear_error():
    """PIL's DDS plugin raises NotImplementedError for pixel formats it lacks (found by the fuzzer)."""
    data = bytearray(_encode(Image.new("RGB", (4, 4)), "DDS"))
    data[80:84] = (0x4000).to_bytes(4, "little")  # ddspf.dwFlags: an unknown pixel format
    with pytest.raises(ParrotError, match="corrupt image"):
        open_image(bytes(data))
