"""Trainer state on disk without pickle: tensors in safetensors, everything else in JSON.

The optimizer's per-parameter state is keyed by parameter name, so a checkpoint refuses to load
into a run that trains a different set of parameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from parrot.errors import ParrotError
from parrot.storage.fsutil import apply_umask, atomic_output_file


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    apply_umask(path)  # safetensors creates it 0600


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ParrotError(f"{path}: not found (incomplete checkpoint?)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ParrotError(f"{path}: unreadable safetensors ({e})") from None


def load_tensors(params: dict[str, torch.Tensor], path: Path) -> None:
    """Copies every tensor of `path` into `params` (same names and shapes, nothing missing)."""
    saved = read_tensors(path)
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ParrotError(f"{path}: holds other tensors than this run trains (missing {missing[:3]}, "
                          f"unexpected {extra[:3]}); was it saved with other --stage / --train-vision / --no-moe?")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(saved[name].shape) != tuple(p.shape):
                raise ParrotError(f"{path}: {name} has shape {tuple(saved[name].shape)}, the model {tuple(p.shape)}")
            p.copy_(saved[name])


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def save_optimizer(optimizer: torch.optim.Optimizer, names: list[str], scheduler: dict, directory: Path) -> None:
    """optimizer.safetensors (per-parameter state tensors) + optimizer.json (groups, scalars, scheduler)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{names[idx]}/{k}"] = v
            else:
                scalars.setdefault(names[idx], {})[k] = v
    save_tensors(tensors, directory / "optimizer.safetensors")
    meta = {"param_names": names, "param_groups": _jsonable(sd["param_groups"]), "scalars": scalars,
            "scheduler": _jsonable(scheduler)}
    with atomic_output_file(directory / "optimizer.json") as f:
        json.dump(meta, f, indent=1)


def load_optimizer(optimizer: torch.optim.Optimizer, names: list[str], directory: Path) -> dict:
    """Restores the optimizer state; returns the scheduler's state dict."""
    try:
        meta = json.loads((directory / "optimizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ParrotError(f"{directory / 'optimizer.json'}: unreadable ({e})") from None
    if meta["param_names"] != names:
        raise ParrotError(f"{directory}: the optimizer state is for other parameters than this run trains")
    tensors = read_tensors(directory / "optimizer.safetensors")
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        name, k = key.rsplit("/", 1)
        state.setdefault(index[name], {})[k] = t
    for name, st in meta["scalars"].items():
        state.setdefault(index[name], {}).update(st)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["scheduler"]


def save_rng(path: Path) -> None:
    t = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            t[f"cuda_{i}"] = s
    save_tensors(t, path)


def load_rng(path: Path) -> None:
    t = read_tensors(path)
    torch.set_rng_state(t["torch_cpu"])
    cuda = [t[f"cuda_{i}"] for i in range(len(t) - 1) if f"cuda_{i}" in t]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
