"""Reading a DeepSpeed ZeRO checkpoint (stage 1-3, any number of ranks) without DeepSpeed: every
parameter consolidated in float32, one at a time, and likewise Adam's moments.

What `engine.save_checkpoint(dir, tag)` writes: `dir/latest` (the tag), and in `dir/tag/`
`*_model_states.pt` (parameter names and shapes per optimizer group, frozen parameters, buffers, the
lr scheduler) and one `zero_pp_rank_R_mp_rank_00_optim_states.pt` per rank (its slice of each
group's flat float32 master weights and optimizer state). The layout, as `zero_to_fp32` reads it:

- stage 1/2: a group's parameters are laid end to end (plus DeepSpeed's alignment padding) in one
  flat vector, cut into equal consecutive slices, one per rank;
- stage 3: every parameter is cut on its own into `ceil(numel / ranks)` pieces, rank R holding
  piece R of each, in order, in its flat groups (the last piece padded).

The files are torch pickles: loaded with `weights_only=True`; DeepSpeed's three small bookkeeping
classes stored in them are read as opaque stand-ins. torch is imported lazily (`parrot convert` of
other sources runs without it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parrot.errors import ParrotError

# DeepSpeed classes pickled inside optimizer states (a loss scaler, an enum, a fragment address)
_DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
MOMENTS = ("exp_avg", "exp_avg_sq")


class _Opaque:
    """Stands in for a DeepSpeed bookkeeping object inside a checkpoint (its contents are kept, unused)."""

    def __init__(self, *args: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def torch_load(path: Path, mmap: bool = False) -> Any:
    import torch

    try:
        with torch.serialization.safe_globals([(_Opaque, name) for name in _DEEPSPEED_GLOBALS]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise ParrotError(f"{path}: unreadable DeepSpeed checkpoint file ({str(e).splitlines()[0][:300]})") from None


def find_tag_dir(directory: Path) -> Path | None:
    """The directory holding the *_states.pt files: `directory` itself, or `directory/<latest tag>`."""
    if any(directory.glob("*_optim_states.pt")):
        return directory
    latest = directory / "latest"
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8").strip()
        if tag and (directory / tag).is_dir():
            return directory / tag
    return None


def is_zero_checkpoint(directory: Path) -> bool:
    return find_tag_dir(directory) is not None


@dataclass
class _Entry:
    shape: tuple[int, ...]
    group: int  # optimizer group (trainable) or -1 (frozen)
    offset: int  # in the group's flat vector (stage 1/2) or in each rank's flat stream (stage 3)


class ZeroCheckpoint:
    def __init__(self, directory: str | Path):
        directory = Path(directory)
        tag_dir = find_tag_dir(directory)
        if tag_dir is None:
            raise ParrotError(f"{directory}: not a DeepSpeed checkpoint (no 'latest' tag file and no "
                              "*_optim_states.pt)")
        self.directory, self.tag_dir = directory, tag_dir
        optim_files = {}
        for f in tag_dir.glob("*_optim_states.pt"):
            m = _RANK.search(f.name)
            if m is None or m.group(2) != "00":
                raise ParrotError(f"{f}: unexpected file name (tensor / pipeline parallel checkpoints are not "
                                  "supported)")
            optim_files[int(m.group(1))] = f
        if sorted(optim_files) != list(range(len(optim_files))):
            raise ParrotError(f"{tag_dir}: optimizer state files of ranks {sorted(optim_files)}: some are missing")
        self.world_size = len(optim_files)
        self._optim = [torch_load(optim_files[r], mmap=True)["optimizer_state_dict"] for r in range(self.world_size)]
        o = self._optim[0]
        stage = o.get("zero_stage")
        self.stage = int(stage.args[0]) if isinstance(stage, _Opaque) else int(stage)
        count = o.get("partition_count")
        saved_world = max(count) if isinstance(count, list) else int(count)
        if saved_world != self.world_size:
            raise ParrotError(f"{tag_dir}: saved by {saved_world} ranks but holds {self.world_size} optimizer files")
        model_files = sorted(tag_dir.glob("*_model_states.pt"))
        if not model_files:
            raise ParrotError(f"{tag_dir}: no *_model_states.pt")
        if self.stage == 3:
            by_rank = {int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)): f for f in model_files}
            if sorted(by_rank) != list(range(self.world_size)):
                raise ParrotError(f"{tag_dir}: model state files of ranks {sorted(by_rank)}: some are missing")
            self._model = [torch_load(by_rank[r]) for r in range(self.world_size)]
        else:
            self._model = [torch_load(model_files[0])]
        self.model_states = self._model[0]
        self._index()

    # ------------------------------------------------------------ layout
    def _flat(self, rank: int, kind: str) -> list:
        o = self._optim[rank]
        if kind == "fp32":
            return o["fp32_flat_groups"] if self.stage == 3 else o["single_partition_of_fp32_groups"]
        base = o["optimizer_state_dict"] if self.stage == 3 else o["base_optimizer_state"]
        try:
            return [base["state"][g][kind] for g in range(len(base["state"]))]
        except KeyError:
            raise ParrotError(f"{self.tag_dir}: no optimizer state {kind!r} (not an Adam checkpoint?)") from None

    def _index(self) -> None:
        ms = self.model_states
        self.entries: dict[str, _Entry] = {}
        paddings = self._optim[0].get("param_alignment_paddings") if self.stage < 3 else None
        stream = 0
        for g, shapes in enumerate(ms["param_shapes"]):
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                shape = tuple(int(s) for s in shape)
                numel = math.prod(shape)
                if self.stage == 3:
                    self.entries[name] = _Entry(shape, g, stream)
                    stream += math.ceil(numel / self.world_size)
                else:
                    self.entries[name] = _Entry(shape, g, offset)
                    offset += numel + (paddings[g][i] if paddings else 0)
        self.trainable = list(self.entries)
        for name, shape in (ms.get("frozen_param_shapes") or {}).items():
            self.entries[name] = _Entry(tuple(int(s) for s in shape), -1, 0)
        self.buffers = {k: v for k, v in ms["module"].items() if k in set(ms.get("buffer_names", []))}
        self.shared = dict(ms.get("shared_params") or {})  # alias -> the name that holds the tensor

    def names(self) -> list[str]:
        return [*self.entries, *self.buffers, *(k for k, v in self.shared.items() if v in self.entries)]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.buffers:
            return tuple(self.buffers[name].shape)
        return self.entries[self.shared.get(name, name)].shape

    # ------------------------------------------------------------ reading
    def read(self, name: str, kind: str = "fp32"):
        """The full tensor of parameter `name` (kind: "fp32" master weights, "exp_avg", "exp_avg_sq")."""
        import torch

        if name in self.buffers:
            return self.buffers[name].float() if self.buffers[name].is_floating_point() else self.buffers[name]
        e = self.entries[self.shared.get(name, name)]
        numel = math.prod(e.shape)
        if e.group < 0:  # frozen: kept in the model states (whole at stage 1/2, in pieces at stage 3)
            if kind != "fp32":
                raise ParrotError(f"{name} is frozen: it has no optimizer state")
            frags = [m["frozen_param_fragments"][name] for m in self._model]
            return torch.cat([f.detach().reshape(-1) for f in frags])[:numel].view(e.shape).clone()
        if self.stage == 3:
            piece = math.ceil(numel / self.world_size)
            parts = [self._stream(r, kind, e.offset, piece) for r in range(self.world_size)]
            return torch.cat(parts).detach()[:numel].view(e.shape).clone()
        flat = torch.cat([self._flat(r, kind)[e.group] for r in range(self.world_size)])
        return flat.detach()[e.offset:e.offset + numel].view(e.shape).clone()

    def _stream(self, rank: int, kind: str, start: int, length: int):
        """length elements from `start` of rank's flat groups laid end to end (stage 3)."""
        import torch

        out, pos = [], 0
        for t in self._flat(rank, kind):
            n = t.numel()
            lo, hi = max(start, pos), min(start + length, pos + n)
            if lo < hi:
                out.append(t[lo - pos:hi - pos])
            pos += n
            if pos >= start + length:
                break
        return torch.cat(out)

    def adam_step(self):
        """Adam's step count (a tensor, as torch keeps it)."""
        o = self._optim[0]
        base = o["optimizer_state_dict"] if self.stage == 3 else o["base_optimizer_state"]
        return base["state"][0]["step"]

    def lr_scheduler_state(self) -> dict | None:
        return self.model_states.get("lr_scheduler")
