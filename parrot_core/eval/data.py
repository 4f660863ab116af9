"""Reading a VLMEvalKit multiple-choice TSV the way VLMEvalKit does, and its images.

Written from a reading of VLMEvalKit's `smp/file.py` (`load`: `pandas.read_csv(sep="\\t")`, so
pandas' quoting rules and its empty-cell semantics: an empty cell, "NA", "None" ... is NaN),
`dataset/image_base.py` (`ImageBaseDataset.__init__`, `dump_image`) and `smp/vlm.py`
(`decode_base64_to_image_file`) in AIDC-AI/Parrot's vendored VLMEvalKit (commit 989d6d0):

- columns: `index`, `question`, option letters `A`, `B`, ... (an empty cell: no such option),
  `answer`, optional `hint`, `category`, `l2-category`, `split`, and `image` (base64) or
  `image_path`; rows whose `image` cell is empty are skipped, as VLMEvalKit does;
- an `image` cell of at most 64 characters names the index of the row holding the image
  (MMBench stores each image once for its rotated copies);
- a base64 image is decoded, RGBA / P images converted to RGB, and the image saved as JPEG
  (PIL's defaults) before the model reads it back: VLMEvalKit's model wrapper opens
  `<index>.jpg`, so the model sees the JPEG-compressed pixels. `image_path` files are read as they
  are (relative paths from the TSV's folder).
"""

from __future__ import annotations

import ast
import base64
import binascii
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, UnidentifiedImageError

from ..errors import ParrotError
from ..model.image import MAX_IMAGE_PIXELS
from .prompt import is_missing, options_of
from .sources import DataSource

REQUIRED = ("index", "question", "answer", "A", "B")
JPEG_MODES = ("1", "L", "RGB", "RGBX", "CMYK", "YCbCr")


def index_key(value: Any) -> str:
    """A row's index as text ("7" for 7, 7.0 or "7"), so files that typed it differently agree."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def is_int_key(key: str) -> bool:
    return key.lstrip("-").isdigit()


def read_table(path: Path, what: str = "dataset", text_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """A TSV / CSV read as VLMEvalKit reads it; one ParrotError for an unreadable file.
    text_columns: columns kept as text instead of pandas' type inference (when present)."""
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        return pd.read_csv(path, sep=sep, dtype=dict.fromkeys(text_columns, str) or None)
    except FileNotFoundError:
        raise ParrotError(f"{path}: {what} file not found") from None
    except UnicodeDecodeError:
        raise ParrotError(f"{path}: not UTF-8 text (expected a {'CSV' if sep == ',' else 'TSV'} {what} file)") from None
    except pd.errors.EmptyDataError:
        raise ParrotError(f"{path}: empty file (expected a {what} with a header row)") from None
    except (pd.errors.ParserError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ParrotError(f"{path}: not a valid {'CSV' if sep == ',' else 'TSV'} file ({first})") from None


@dataclass
class EvalDataset:
    """One multiple-choice dataset: its rows (every column but `image`, values as pandas read them)."""

    name: str
    path: Path
    columns: list[str]
    rows: list[dict[str, Any]]
    keys: list[str]
    images: dict[str, str] = field(default_factory=dict)  # index key -> base64 (references resolved lazily)
    skipped_no_image: int = 0
    problems: dict[str, str] = field(default_factory=dict)  # index key -> what is wrong with that row's data
    _position: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def circular(self) -> bool:
        """VLMEvalKit scores datasets whose name contains "mmbench" with circular evaluation."""
        return "mmbench" in self.name.lower()

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, limit: int | None) -> list[int]:
        """Positions of the rows to answer: all, or the first `limit` questions (with all their
        rotations when circular)."""
        if limit is None:
            return list(range(len(self.rows)))
        if not self.circular:
            return list(range(min(limit, len(self.rows))))
        groups = [k for k in self.keys if int(k) < 1_000_000][:limit]
        keep = set(groups)
        return [i for i, k in enumerate(self.keys) if str(int(k) % 1_000_000) in keep]

    def image_bytes(self, key: str) -> bytes | Path:
        """The image of a row as the model should read it: JPEG bytes (from base64) or a file path.
        Raises ParrotError when the row has no usable image."""
        if self.images:
            b64 = self.images.get(key)
            if b64 is not None and len(b64) <= 64:
                ref = b64.strip()
                b64 = self.images.get(ref)
                if b64 is None or len(b64) <= 64:
                    raise ParrotError(f"its image refers to index {ref}, which holds no image")
            if b64 is None:
                raise ParrotError("no image")
            return vlmevalkit_jpeg(b64)
        return self._image_path(self.rows[self.position[key]].get("image_path"))

    def _image_path(self, value: Any) -> Path:
        if is_missing(value):
            raise ParrotError("empty image_path")
        text = str(value).strip()
        paths = [text]
        if text.startswith("[") and text.endswith("]"):
            try:
                paths = [str(x) for x in ast.literal_eval(text)]
            except (ValueError, SyntaxError):
                raise ParrotError(f"image_path {text[:80]!r} is not a list of paths") from None
        if len(paths) != 1:
            raise ParrotError(f"{len(paths)} images; Parrot answers about one image")
        p = Path(paths[0]).expanduser()
        if not p.is_absolute() and (self.path.parent / p).exists():
            p = self.path.parent / p
        if not p.is_file():
            raise ParrotError(f"image not found: {paths[0]}")
        return p

    @property
    def position(self) -> dict[str, int]:
        """index key -> row position."""
        if len(self._position) != len(self.keys):
            self._position = {k: i for i, k in enumerate(self.keys)}
        return self._position


def vlmevalkit_jpeg(b64: str) -> bytes:
    """A base64 image as VLMEvalKit's wrapper reads it: decoded, RGBA / P -> RGB, saved as JPEG."""
    try:
        raw = base64.b64decode(b64)
    except (binascii.Error, ValueError) as e:
        raise ParrotError(f"its image is not valid base64 ({e})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS
        try:
            with Image.open(io.BytesIO(raw)) as im:
                im.load()
                if im.mode in ("RGBA", "P"):
                    im = im.convert("RGB")
                elif im.mode not in JPEG_MODES:  # VLMEvalKit would fail to save these as JPEG
                    im = im.convert("RGB")
                buf = io.BytesIO()
                im.save(buf, format="JPEG")
                return buf.getvalue()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ParrotError(f"its image is too large (over {MAX_IMAGE_PIXELS:,} pixels)") from None
        except UnidentifiedImageError:
            raise ParrotError("its image does not decode (PIL cannot identify it)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ParrotError(f"its image does not decode ({e})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old


def read_dataset(source: DataSource, need_images: bool = True) -> EvalDataset:
    """Reads and checks a dataset. Whole-file problems raise ParrotError; a row whose answer is not
    one of its options is kept (VLMEvalKit scores it as wrong) and listed in `problems`."""
    path = source.path
    df = read_table(path)
    cols = [str(c) for c in df.columns]
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        what = "a multiple-choice dataset needs option columns A and B" if {"A", "B"} & set(missing) else ""
        raise ParrotError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                          f"(VLMEvalKit MCQ TSV: index, question, A, B[, C, D], answer, image or image_path)"
                          + (f"; {what}" if what else ""))
    if need_images and "image" not in cols and "image_path" not in cols:
        raise ParrotError(f"{path}: no image column (base64 `image` or `image_path`)")
    images: dict[str, str] = {}
    skipped = 0
    if "image" in cols:
        keep = ~df["image"].isna()
        skipped = int((~keep).sum())
        df = df[keep]
    if df["index"].isna().any():
        raise ParrotError(f"{path}: {int(df['index'].isna().sum())} row(s) have an empty index")
    keys = [index_key(v) for v in df["index"]]
    dupes = sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) != len(keys) else []
    if dupes:
        raise ParrotError(f"{path}: duplicate index {', '.join(dupes[:5])}{' ...' if len(dupes) > 5 else ''}; "
                          "each row needs its own index")
    ds = EvalDataset(source.name, path, [c for c in cols if c != "image"], [], keys, skipped_no_image=skipped)
    if ds.circular and not all(is_int_key(k) for k in keys):
        bad = next(k for k in keys if not is_int_key(k))
        raise ParrotError(f"{path}: index {bad!r} is not an integer; circular (MMBench) evaluation groups rows "
                          "by index modulo 1,000,000")
    if "image" in cols:
        images = {k: str(v) for k, v in zip(keys, df["image"])}
        df = df.drop(columns=["image"])
    ds.images = images
    ds.rows = df.to_dict("records")
    for k, row in zip(keys, ds.rows):
        options = options_of(row)
        answer = row["answer"]
        if is_missing(answer) or str(answer).strip() not in options:
            shown = "empty" if is_missing(answer) else repr(str(answer))
            ds.problems[k] = f"answer {shown} is not one of its options ({', '.join(options) or 'none'})"
    return ds
