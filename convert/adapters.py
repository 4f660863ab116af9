"""`parrot convert ADAPTER DST --adapter-format peft|mlx-lm`: a LoRA adapter from one format into the other.

Reads either format (parrot.training.adapter.read_adapter) and writes the other; the LoRA pairs, the
fully trained projector / MoE tensors and our record travel unchanged, so ours -> PEFT -> ours gives
back the same tensors and adapter_config.json. DST is written atomically (the output rule).
"""

from __future__ import annotations

from pathlib import Path

from parrot.errors import ParrotError
from parrot.storage.fsutil import atomic_output_dir
from parrot.training.adapter import FORMATS, read_adapter, write_adapter


def convert_adapter(src: str | Path, dst: str | Path, fmt: str, force: bool = False) -> str:
    """Writes the adapter `src` into `dst` in `fmt`; returns the format it was read in."""
    if fmt not in FORMATS:
        raise ParrotError(f"--adapter-format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ParrotError(f"{dst}: the output must not be the adapter {src} nor lie inside it")
    adapter = read_adapter(src)
    with atomic_output_dir(dst, force=force, command="convert") as tmp:
        write_adapter(adapter, tmp, fmt)
    return adapter.format
