"""Images: memory bounded by the pixel count after every preprocessing step (a thin image padded to a square,
a huge upscale), in preprocessing, chat, generate and the training data check; high-bit-depth grayscale
scaled to 8 bits instead of clipped to white."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from conftest import assert_clean_failure, requires_torch, run_parrot
from parrot.errors import ParrotError
from parrot.model.image import ImageSettings, open_image, preprocess


@pytest.fixture(scope="module")
def thin_png(tmp_path_factory):
    p = tmp_path_factory.mktemp("thin") / "thin.png"
    Image.new("RGB", (30000, 1), (200, 10, 10)).save(p, optimize=True)
    assert p.stat().st_size < 400  # a few hundred bytes; padded to a square it would be 900 M pixels
    return p


def test_thin_png_is_refused_quickly_with_bounded_memory(thin_png):
    """In a subprocess capped at 1 GiB of address space: before the fix it allocated 2.7 GB (and took 18 s)."""
    script = textwrap.dedent(f"""
        import resource, time
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from parrot.errors import ParrotError
        from parrot.model.image import ImageSettings, preprocess
        t = time.perf_counter()
        try:
            preprocess({str(thin_png)!r}, ImageSettings())
            print("accepted")
        except ParrotError as e:
            print("refused:", e)
        print("seconds", time.perf_counter() - t)
        # VmHWM: this process's own peak (ru_maxrss would carry the forking test runner's across exec)
        hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print("peak_mib", int(hwm.split()[1]) / 1024)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert "pads to a square of 30000x30000 pixels" in lines["refused:"]
    assert float(lines["seconds"]) < 1.0
    assert float(lines["peak_mib"]) < 300


def test_every_step_is_checked_before_it_is_allocated():
    no_pad = ImageSettings(pad_to_square=False)
    with pytest.raises(ParrotError, match=r"1x30000 image is resized to 336x10080000 pixels"):
        preprocess(Image.new("RGB", (1, 30000)), no_pad)  # a huge upscale
    with pytest.raises(ParrotError, match="pads to a square of 20000x20000"):
        preprocess(Image.new("RGB", (20000, 3)), ImageSettings())  # a PIL image too, not only files
    with pytest.raises(ParrotError, match="empty"):
        preprocess(Image.new("RGB", (0, 5)), ImageSettings())
    ok = preprocess(Image.new("RGB", (5000, 2), (255, 255, 255)), ImageSettings.clip_defaults(16))  # 25 M pixels
    assert ok.shape == (1, 3, 16, 16) and np.isfinite(ok).all()


@requires_torch
def test_chat_refuses_the_thin_image_before_loading_the_model(thin_png, tiny_ckpt):
    proc = run_parrot("chat", "--backend", "cpu", "--model", tiny_ckpt, thin_png, "--prompt", "hi", timeout=60)
    assert_clean_failure(proc, "thin.png", "pads to a square")
    assert "Loading" not in proc.stderr


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    v = np.linspace(0, 65535, 64 * 40).round().astype(np.uint16).reshape(40, 64)
    Image.fromarray(v).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    got = np.asarray(open_image(tmp_path / "g16.png"))
    want = np.floor(v.astype(np.float64) / 257 + 0.5).astype(np.uint8)  # v * 255 / 65535, rounded half up
    assert got.shape == (40, 64, 3) and all(np.array_equal(got[..., c], want) for c in range(3))
    assert (got == 255).mean() < 0.01  # clipping made 99.6% of it white
    # preprocessing the 16-bit file equals preprocessing its exact 8-bit equivalent (bit for bit)
    s = ImageSettings.clip_defaults(24)
    assert np.array_equal(preprocess(tmp_path / "g16.png", s), preprocess(Image.fromarray(want, "L"), s))


def test_32bit_and_float_grayscale_are_scaled():
    v = np.linspace(0, 65535, 300).round().astype(np.int32).reshape(10, 30)
    want16 = np.floor(v / 257 + 0.5).astype(np.uint8)
    assert np.array_equal(np.asarray(open_image(Image.fromarray(v, "I")))[..., 0], want16)
    f = np.linspace(0, 1, 300, dtype=np.float32).reshape(10, 30)
    assert np.array_equal(np.asarray(open_image(Image.fromarray(f, "F")))[..., 1],
                          np.floor(f.astype(np.float64) * 255 + 0.5).astype(np.uint8))
    neg = np.linspace(-1000, 3000, 300, dtype=np.float32).reshape(10, 30)  # out of range: min..max -> 0..255
    got = np.asarray(open_image(Image.fromarray(neg, "F")))[..., 2]
    assert got.min() == 0 and got.max() == 255 and np.all(np.diff(got.astype(int), axis=1) >= 0)
    small = np.arange(200, dtype=np.int32).reshape(10, 20)  # already 8-bit values: as PIL converts them
    assert np.array_equal(np.asarray(open_image(Image.fromarray(small, "I"))),
                          np.asarray(Image.fromarray(small, "I").convert("RGB")))


def test_training_data_drops_an_image_too_large_once_padded(thin_png, tiny_ckpt, tmp_path):
    import json

    from parrot.model.tokenizer import Tokenizer
    from parrot.training.data import IMAGE_TOO_LARGE, LlavaData

    Image.new("RGB", (20, 30), (1, 2, 3)).save(tmp_path / "ok.png")
    convs = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A line."}]
    samples = [{"id": "thin", "image": str(thin_png), "conversations": convs},
               {"id": "ok", "image": "ok.png", "conversations": convs}]
    (tmp_path / "data.json").write_text(json.dumps(samples))
    data = LlavaData(tmp_path / "data.json", tmp_path, Tokenizer.from_dir(tiny_ckpt), ImageSettings(), 10)
    assert [s.id for s in data.samples] == ["ok"]
    assert [d["id"] for d in data.report.dropped[IMAGE_TOO_LARGE]] == ["thin"]
