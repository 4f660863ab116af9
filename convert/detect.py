"""Which kind of source a directory is: each kind recognizes its own files; the first that matches opens it.

Training checkpoints (DeepSpeed ZeRO, torch.distributed.checkpoint, one process) come before the Parrot-directory
catch-all. A new kind is one more entry in `KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from parrot.backends.torch_cuda.dcp_checkpoint import is_dcp_checkpoint
from parrot.errors import ParrotError

from .run_checkpoint import is_run_checkpoint, open_run_checkpoint
from .sources import Source, open_parrot_dir
from .training_sources import is_deepspeed_dir, open_dcp, open_deepspeed

# (name, matches(path), open(path, vision_tower, description))
KINDS: list[tuple[str, Callable[[Path], bool], Callable[..., Source]]] = [
    ("DeepSpeed ZeRO checkpoint (parrot train --deepspeed)", is_deepspeed_dir, open_deepspeed),
    ("torch.distributed.checkpoint directory (parrot train --fsdp)", is_dcp_checkpoint, open_dcp),
    ("training checkpoint (parrot train, one process: the trained tensors)", is_run_checkpoint, open_run_checkpoint),
    ("parrot directory (official or MLX layout)", lambda p: True, open_parrot_dir),
]


def open_source(path: str | Path, vision_tower=None, description: str | Path | None = None) -> Source:
    """Detects the kind of `path` and opens it (validated against its config before any read).
    description: for a training checkpoint, the directory with its config.json, tokenizer and
    preprocessor settings (default: found next to it)."""
    path = Path(path)
    if not path.exists():
        raise ParrotError(f"{path}: source not found")
    if not path.is_dir():
        raise ParrotError(f"{path}: not a directory (a Parrot model is a directory with config.json)")
    for _, matches, open_ in KINDS:
        if matches(path):
            return open_(path, vision_tower, description)
    raise ParrotError(f"{path}: not a model directory of a known kind ({', '.join(n for n, _, _ in KINDS)})")
