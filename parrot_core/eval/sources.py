"""Dataset names known to VLMEvalKit for the Parrot paper, and their download into a cache.

URLs and md5 sums are those of `vlmeval/dataset/image_mcq.py` (MMMB_URLS, MTL_MMBench_URLS and
their md5 tables) in AIDC-AI/Parrot's vendored VLMEvalKit; the collections `MMMB` and
`MTL_MMBench_DEV` are its `ConcatDataset.DATASET_SETS`. A name is looked up, in order, in our cache
(`$PARROT_EVAL_DATA`, default `~/.cache/parrot/eval`) and in VLMEvalKit's (`$LMUData`, default
`~/LMUData`), each file checked against its md5; otherwise it is downloaded with plain HTTP
(`HF_ENDPOINT` is honoured, as VLMEvalKit does) into our cache through a temporary file that is
renamed into place only when its md5 is right.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import ParrotError

LANGUAGES = ("en", "cn", "pt", "ar", "tr", "ru")  # the paper's order; "cn" is Chinese (zh)
_BASE = "https://huggingface.co/datasets/AIDC-AI/Parrot-dataset/resolve/main"
MD5 = {
    "MMMB_ar": "f3a18b6385f1d9701840aa42de27aead", "MMMB_cn": "13ed82fa89730037292fcaa27f08f430",
    "MMMB_en": "1cd781a71ec5a2983c090b84105d6a01", "MMMB_pt": "548ea2b3bb2da991790386f0015d30d1",
    "MMMB_ru": "ce1cc8a0533425ab0d86b326ebfc2984", "MMMB_tr": "0733739d43090327975294292bc5cd67",
    "MMBench_dev_ar": "4271b4a0d0200e1a86380a878e0d64a4", "MMBench_dev_cn": "2ed5135326fed02c8e51ea50dda8222f",
    "MMBench_dev_en": "d9ab776fc018b3d45785e9a5c23431c2", "MMBench_dev_pt": "4ddfbcd27ef12444b908c03831cd0295",
    "MMBench_dev_tr": "4fab39d501389d3d6cc90264bb708f11", "MMBench_dev_ru": "5ba1171ff2e68f80637bf78349e402a5",
}
URLS = {name: f"{_BASE}/{'mmmb' if name.startswith('MMMB') else 'mmbench'}/{name.lower()}.tsv" for name in MD5}
COLLECTIONS = {
    "MMMB": [f"MMMB_{lang}" for lang in LANGUAGES],
    "MTL_MMBench_DEV": [f"MMBench_dev_{lang}" for lang in LANGUAGES],
}


@dataclass(frozen=True)
class DataSource:
    """One dataset to evaluate: its name (outputs are named after it) and its TSV file."""

    name: str
    path: Path


def known_names() -> list[str]:
    return [*COLLECTIONS, *MD5]


def cache_dir() -> Path:
    return Path(os.environ.get("PARROT_EVAL_DATA") or Path.home() / ".cache" / "parrot" / "eval")


def vlmevalkit_dir() -> Path:
    return Path(os.environ.get("LMUData") or Path.home() / "LMUData")


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(spec: str) -> str | None:
    by_lower = {n.lower(): n for n in known_names()}
    return by_lower.get(spec.lower())


def resolve_sources(specs: list[str], download: bool = True, progress: bool = True) -> list[DataSource]:
    """DATA arguments -> datasets: a TSV path (named after its stem), a known name or a collection.

    Raises ParrotError for a name that is neither a file nor known, for a known dataset that is not
    cached and cannot be downloaded, and for two datasets with the same name (their outputs would clash).
    """
    out: list[DataSource] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.exists():
            if not p.is_file():
                raise ParrotError(f"{spec}: not a file (DATA is a VLMEvalKit TSV file or a dataset name)")
            out.append(DataSource(p.stem, p))
            continue
        name = _canonical(spec)
        if name is None:
            raise ParrotError(f"{spec}: no such file, and not a dataset name known here "
                              f"({', '.join(known_names())}); pass a VLMEvalKit TSV file instead")
        for sub in COLLECTIONS.get(name, [name]):
            out.append(DataSource(sub, fetch(sub, download, progress)))
    seen: dict[str, Path] = {}
    for s in out:
        if s.name in seen and seen[s.name].resolve() != s.path.resolve():
            raise ParrotError(f"two datasets are named {s.name!r} ({seen[s.name]} and {s.path}); their outputs "
                              "would overwrite each other: rename one file")
        seen[s.name] = s.path
    unique = {s.name: s for s in out}
    return list(unique.values())


def fetch(name: str, download: bool = True, progress: bool = True) -> Path:
    """The cached TSV of a known dataset (md5 checked), downloading it when missing."""
    file_name = URLS[name].rsplit("/", 1)[1]
    for folder in (cache_dir(), vlmevalkit_dir()):
        p = folder / file_name
        if p.is_file() and md5_file(p) == MD5[name]:
            return p
    dst = cache_dir() / file_name
    stale = [str(folder / file_name) for folder in (cache_dir(), vlmevalkit_dir()) if (folder / file_name).is_file()]
    if not download:
        raise ParrotError(f"{name}: not in the cache ({dst}) and downloading is off")
    try:
        download_file(URLS[name], dst, MD5[name], progress)
    except ParrotError as e:
        if stale:
            raise ParrotError(f"{e} ({', '.join(stale)} does not have VLMEvalKit's md5 {MD5[name]}: a changed or "
                              "partial copy; pass it as a file to use it anyway)") from None
        raise
    return dst


def download_file(url: str, dst: Path, md5: str | None = None, progress: bool = True) -> None:
    """Downloads `url` to `dst` through a temporary file, renamed into place once complete (and its md5 right)."""
    endpoint = os.environ.get("HF_ENDPOINT", "")
    if "huggingface.co" in url and endpoint:
        url = url.replace("https://huggingface.co", endpoint.rstrip("/"))
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ParrotError(f"{dst.parent}: cannot create the dataset cache ({e.strerror}); "
                          "set PARROT_EVAL_DATA to a writable folder") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.part-", dir=dst.parent)
    h = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            bar = _bar(total, dst.name) if progress else None
            while chunk := r.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
        if md5 is not None and h.hexdigest() != md5:
            raise ParrotError(f"{url}: the download's md5 is {h.hexdigest()}, expected {md5} (a changed or corrupt "
                              "file); try again, or download it yourself and pass the file")
        os.replace(tmp, dst)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ParrotError(f"cannot download {url} ({reason}). If you are offline, download the file elsewhere and "
                          "pass its path as DATA") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _bar(total: int | None, name: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}", dynamic_ncols=True)
