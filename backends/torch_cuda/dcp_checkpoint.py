"""Reading a torch.distributed.checkpoint (DCP) directory, as `parrot train --fsdp` writes it
(`{"model": model state dict, "optimizer": ...}`), one full tensor at a time, in one process.

DCP's `.metadata` is a pickle written by torch itself (DCP reads it with `pickle.load`): open
checkpoints you trust. torch is imported lazily (`parrot convert` of other sources runs without it).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from parrot.errors import ParrotError

PREFIX = "model."  # the model state dict's keys in the flattened DCP namespace


def is_dcp_checkpoint(directory: Path) -> bool:
    return (Path(directory) / ".metadata").is_file()


class DcpCheckpoint:
    def __init__(self, directory: str | Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.directory = Path(directory)
        if not is_dcp_checkpoint(self.directory):
            raise ParrotError(f"{self.directory}: not a DCP checkpoint (no .metadata)")
        try:
            md = FileSystemReader(str(self.directory)).read_metadata()
        except Exception as e:  # a truncated or foreign pickle fails in many ways
            raise ParrotError(f"{self.directory / '.metadata'}: unreadable DCP metadata ({e})") from None
        self.meta = {k[len(PREFIX):]: m for k, m in md.state_dict_metadata.items()
                     if k.startswith(PREFIX) and isinstance(m, TensorStorageMetadata)}
        if not self.meta:
            raise ParrotError(f"{self.directory}: the DCP checkpoint holds no model tensors (no 'model.*' keys)")

    def names(self) -> list[str]:
        return list(self.meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.meta[name].size)

    def read(self, name: str):
        """The full tensor `name`, reassembled from every rank's shards."""
        import torch
        import torch.distributed.checkpoint as dcp

        m = self.meta[name]
        t = torch.empty(tuple(m.size), dtype=m.properties.dtype)
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.load({"model": {name: t}}, checkpoint_id=str(self.directory), no_dist=True)
        except Exception as e:  # missing / truncated shard files
            raise ParrotError(f"{self.directory}: reading {name} failed ({str(e).splitlines()[0][:300]})") from None
        return t
