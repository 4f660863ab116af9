"""Preprocessing equals the official pipeline: pad to square with the mean colour, CLIP resize/crop/normalize."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import random_image
from parrot.errors import ParrotError
from parrot.model.image import CLIP_MEAN, CLIP_STD, ImageSettings, preprocess

SIZES = [(37, 23), (19, 50), (30, 30), (7, 3), (400, 120), (336, 500)]


def padded_reference(a: np.ndarray) -> np.ndarray:
    """Independent pad-to-square: the image centred on a (122, 116, 104) canvas."""
    h, w, _ = a.shape
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[:] = (122, 116, 104)
    out[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = a
    return out


@pytest.mark.parametrize("w,h", SIZES)
def test_preprocess_matches_transformers_clip_processor(w, h):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    a = np.asarray(random_image(w, h, seed=w * h))
    settings = ImageSettings.clip_defaults(30)
    ref = CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})(
        Image.fromarray(padded_reference(a)), return_tensors="np")["pixel_values"]
    got = preprocess(Image.fromarray(a), settings)
    assert got.dtype == np.float32 and got.shape == (1, 3, 30, 30)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_padding_colour_and_normalization_in_float64():
    """A 1-pixel-high image is centred on row 5 of a mean-colour square (no resize at 12 px)."""
    a = np.full((1, 12, 3), 255, np.uint8)
    s = ImageSettings.clip_defaults(12)
    got = preprocess(Image.fromarray(a), s)[0]
    want_pad = (np.array([122, 116, 104]) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(got[:, 0, 0], want_pad, atol=1e-6)
    want_white = (1.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(got[:, 5, :], want_white[:, None].repeat(12, 1), atol=1e-5)  # row (12 - 1) // 2


def test_settings_from_preprocessor_config(tmp_path):
    cfg = {"crop_size": 24, "size": 24, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    s = ImageSettings.from_file(tmp_path / "preprocessor_config.json")
    assert (s.crop_height, s.shortest_edge, s.background) == (24, 24, (127, 127, 127))
    got = preprocess(Image.new("RGB", (24, 24), (255, 0, 127)), s)
    np.testing.assert_allclose(got[0, :, 0, 0], [1.0, -1.0, (127 / 255 - 0.5) / 0.5], atol=1e-6)


def test_preprocess_accepts_path_bytes_and_pil(tmp_path):
    im = random_image(20, 11, seed=9)
    p = tmp_path / "x.jpg"
    im.save(p, quality=95)
    s = ImageSettings.clip_defaults(14)
    from_path = preprocess(p, s)
    assert np.array_equal(from_path, preprocess(p.read_bytes(), s))
    assert np.array_equal(from_path, preprocess(Image.open(p), s))


def test_bad_images_raise_clear_errors(tmp_path):
    s = ImageSettings.clip_defaults(14)
    with pytest.raises(ParrotError, match="image not found"):
        preprocess(tmp_path / "nope.png", s)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ParrotError, match="not an image"):
        preprocess(tmp_path / "notes.txt", s)
    random_image(64, 64).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ParrotError, match="truncated or corrupt"):
        preprocess(tmp_path / "cut.png", s)
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")  # 400 Mpx, a few KB on disk
    with pytest.raises(ParrotError, match="too large"):
        preprocess(tmp_path / "bomb.png", s)
