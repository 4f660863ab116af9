"""Model paths: a local directory, or a hub id downloaded with huggingface_hub when online."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ParrotError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "tokenizer*"]


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not Path(name).exists()


def download(repo_id: str, allow_patterns: list[str] | None = None) -> Path:
    """snapshot_download with one clear error when the hub cannot be reached."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ParrotError(f"{repo_id}: downloading needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns or ALLOW_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo, network errors
        kind = type(e).__name__
        raise ParrotError(
            f"{repo_id}: not a local directory, and downloading it from the Hugging Face hub failed ({kind}: "
            f"{str(e).splitlines()[0] if str(e) else 'no details'}). If you are offline, download the model "
            "elsewhere and pass its directory."
        ) from None


DEMO_NAME = "demo"


def demo_model_dir() -> Path:
    """The demo Parrot shipped inside the package (scripts/make_demo.py made it)."""
    return Path(__file__).resolve().parent.parent / "demo" / "model"


def resolve_model_path(path: str | Path) -> Path:
    """A local directory as is; `demo` (unless a model directory of that name is here): the bundled demo model;
    a hub id: downloaded (or found in the hub cache)."""
    p = Path(path)
    is_demo = str(path) == DEMO_NAME
    if p.exists() and not (is_demo and not (p / "config.json").is_file()):
        return p
    if is_demo:
        d = demo_model_dir()
        if not (d / "config.json").is_file():
            raise ParrotError(f"the demo model is not installed ({d} is missing); reinstall parrot-vlm, or rebuild "
                              "it with `python scripts/make_demo.py --output runs/demo`")
        return d
    if is_hub_id(str(path)):
        return download(str(path))
    raise ParrotError(f"{path}: model directory not found")
