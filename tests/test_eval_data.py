"""Reading VLMEvalKit TSVs (pandas semantics, image references, the JPEG the wrapper sees), dataset
names and their download into the cache (mocked: no network in tests)."""

from __future__ import annotations

import base64
import hashlib
import io
import math

import numpy as np
import pytest
from eval_helpers import circular_rows, image_b64, mcq_rows, write_tsv
from PIL import Image

from parrot.errors import ParrotError
from parrot.eval import sources
from parrot.eval.data import read_dataset, vlmevalkit_jpeg
from parrot.eval.sources import DataSource, resolve_sources


def _read(path, **kw):
    return read_dataset(DataSource(path.stem, path), **kw)


def test_pandas_semantics_for_empty_and_none_cells(tmp_path):
    rows = mcq_rows(3)
    rows[0]["D"] = "None"  # pandas reads "None" as NaN: no option D
    rows[2]["C"] = "NA"
    ds = _read(write_tsv(tmp_path / "s.tsv", rows))
    assert math.isnan(ds.rows[0]["D"]) and ds.rows[0]["C"] == "blue"
    assert math.isnan(ds.rows[1]["D"])  # an empty cell
    assert math.isnan(ds.rows[2]["C"])
    assert ds.keys == ["0", "1", "2"] and not ds.circular
    assert ds.columns == ["index", "question", "A", "B", "C", "D", "answer", "category", "l2-category", "hint"]
    assert ds.problems == {}


def test_embedded_tabs_newlines_and_quotes_survive(tmp_path):
    ds = _read(write_tsv(tmp_path / "s.tsv", mcq_rows(4)))
    assert ds.rows[2]["question"] == 'Is it "day" or night?\tThink.'
    assert ds.rows[3]["question"] == "Which shape is it?\nLook closely."


def test_base64_images_are_seen_as_vlmevalkit_saves_them(tmp_path):
    rgba = image_b64(5, mode="RGBA")
    ds = _read(write_tsv(tmp_path / "s.tsv", [{**mcq_rows(1)[0], "image": rgba}]))
    got = ds.image_bytes("0")
    # what decode_base64_to_image_file writes to <index>.jpg: RGBA -> RGB, then JPEG with PIL's defaults
    im = Image.open(io.BytesIO(base64.b64decode(rgba))).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=75)
    assert got == buf.getvalue()
    decoded = np.asarray(Image.open(io.BytesIO(got)).convert("RGB"), dtype=np.int16)
    assert np.abs(decoded - np.asarray(im, dtype=np.int16)).max() > 0  # lossy: not the original pixels


def test_rotations_name_the_row_holding_their_image(tmp_path):
    ds = _read(write_tsv(tmp_path / "MMBench_x.tsv", circular_rows(2)))
    assert ds.circular
    assert ds.image_bytes("2000001") == ds.image_bytes("1") == vlmevalkit_jpeg(image_b64(1))
    assert ds.select(1) == [0, 1, 2, 3]  # question 0 and its three rotations
    broken = write_tsv(tmp_path / "MMBench_y.tsv", [{**circular_rows(1)[1], "image": "77"}])
    with pytest.raises(ParrotError, match="refers to index 77"):
        _read(broken).image_bytes("1000000")


def test_rows_without_an_image_are_skipped_and_bad_images_fail_per_row(tmp_path):
    rows = mcq_rows(3)
    rows[1]["image"] = None
    rows[2]["image"] = base64.b64encode(b"not an image at all, but long enough to be base64 data......").decode()
    ds = _read(write_tsv(tmp_path / "s.tsv", rows))
    assert ds.keys == ["0", "2"] and ds.skipped_no_image == 1
    with pytest.raises(ParrotError, match="does not decode"):
        ds.image_bytes("2")


def test_image_path_column_is_read_relative_to_the_tsv(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "img" / "a.png")
    rows = [{**r, "image": None} for r in mcq_rows(2)]
    for r, p in zip(rows, ["img/a.png", "['img/a.png', 'img/b.png']"]):
        r.pop("image")
        r["image_path"] = p
    ds = _read(write_tsv(tmp_path / "s.tsv", rows))
    assert ds.image_bytes("0") == tmp_path / "img" / "a.png"
    with pytest.raises(ParrotError, match="2 images"):
        ds.image_bytes("1")


@pytest.mark.parametrize("change, message", [
    (lambda rows: [{k: v for k, v in r.items() if k != "answer"} for r in rows], "missing column answer"),
    (lambda rows: [{k: v for k, v in r.items() if k not in ("A", "B")} for r in rows], "option columns A and B"),
    (lambda rows: [{k: v for k, v in r.items() if k != "image"} for r in rows], "no image column"),
    (lambda rows: [{**r, "index": 7} for r in rows], "duplicate index 7"),
])
def test_bad_files_fail_with_one_clear_error(tmp_path, change, message):
    with pytest.raises(ParrotError, match=message):
        _read(write_tsv(tmp_path / "s.tsv", change(mcq_rows(3))))


def test_answer_that_is_not_an_option_is_reported_for_its_row(tmp_path):
    rows = mcq_rows(3)
    rows[1]["answer"] = "D"  # row 1 has no option D
    rows[2]["answer"] = None
    ds = _read(write_tsv(tmp_path / "s.tsv", rows))
    assert set(ds.problems) == {"1", "2"}
    assert "'D' is not one of its options (A, B, C)" in ds.problems["1"]


def test_unreadable_files_fail_cleanly(tmp_path):
    (tmp_path / "empty.tsv").write_text("")
    (tmp_path / "bin.tsv").write_bytes(b"\xff\xfe\x00\x01" * 10)
    for name, message in [("empty.tsv", "empty file"), ("bin.tsv", "not UTF-8")]:
        with pytest.raises(ParrotError, match=message):
            _read(tmp_path / name)


# ---------------------------------------------------------------------------- names and downloads
class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


@pytest.fixture
def caches(tmp_path, monkeypatch):
    monkeypatch.setenv("PARROT_EVAL_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("LMUData", str(tmp_path / "lmu"))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return tmp_path


def test_known_name_downloads_once_into_the_cache_with_md5_check(caches, monkeypatch):
    body = b"index\tquestion\n1\tq\n"
    monkeypatch.setitem(sources.MD5, "MMMB_en", hashlib.md5(body).hexdigest())
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return FakeResponse(body)

    monkeypatch.setattr(sources.urllib.request, "urlopen", fake_urlopen)
    [src] = resolve_sources(["mmmb_EN"], progress=False)
    assert src == DataSource("MMMB_en", caches / "cache" / "mmmb_en.tsv")
    assert src.path.read_bytes() == body
    assert urls == ["https://huggingface.co/datasets/AIDC-AI/Parrot-dataset/resolve/main/mmmb/mmmb_en.tsv"]
    resolve_sources(["MMMB_en"], progress=False)
    assert len(urls) == 1  # cached
    assert [p.name for p in (caches / "cache").iterdir()] == ["mmmb_en.tsv"]


def test_vlmevalkit_cache_is_used_and_collections_expand(caches, monkeypatch):
    (caches / "lmu").mkdir()
    for name in sources.COLLECTIONS["MMMB"]:
        body = f"index\tquestion\n1\t{name}\n".encode()
        (caches / "lmu" / f"{name.lower()}.tsv").write_bytes(body)
        monkeypatch.setitem(sources.MD5, name, hashlib.md5(body).hexdigest())
    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded"))
    got = resolve_sources(["MMMB"], progress=False)
    assert [s.name for s in got] == ["MMMB_en", "MMMB_cn", "MMMB_pt", "MMMB_ar", "MMMB_tr", "MMMB_ru"]
    assert all(s.path.parent == caches / "lmu" for s in got)


def test_wrong_md5_leaves_nothing_behind(caches, monkeypatch):
    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda url, timeout: FakeResponse(b"tampered"))
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example")
    with pytest.raises(ParrotError, match="md5"):
        resolve_sources(["MMBench_dev_ru"], progress=False)
    assert list((caches / "cache").iterdir()) == []


def test_offline_and_unknown_names_fail_cleanly(caches, monkeypatch):
    def offline(url, timeout):
        raise sources.urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(sources.urllib.request, "urlopen", offline)
    with pytest.raises(ParrotError, match="cannot download .*mmmb_tr.tsv .*offline"):
        resolve_sources(["MMMB_tr"], progress=False)
    with pytest.raises(ParrotError, match="not a dataset name known here"):
        resolve_sources(["MMMB_xx"], progress=False)
