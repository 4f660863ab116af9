"""The backends, in one table: each name maps to its model class, its trainer, what it needs installed
and what it can do. Shared code asks a `BackendSpec` for capabilities; it never compares names.

Entries name their classes as "module:attribute" strings, imported only when used (mlx-lm resolves
model classes the same way), so `import parrot` imports neither torch nor mlx. Adding a backend is
one package under `backends/` implementing `parrot.contract.ModelBackend` plus one entry here
(docs/architecture.md, "Adding a backend").
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ParrotError


@dataclass(frozen=True)
class BackendSpec:
    name: str
    model: str  # "module:Class" of the loaded model (a parrot.api.ParrotModel)
    trainer: str  # "module:function" running a prepared training run
    requires: tuple[str, ...]  # modules that must import
    install: str  # what to install when they don't
    family: str  # backends of one family share weights in memory and training checkpoints ("torch", "mlx")
    framework: str  # what `requires` is, in messages ("MLX", "PyTorch")
    description: str
    device: str | None = None  # the torch device, for torch backends
    probe: str | None = None  # "module:function" -> None when usable, else why not (e.g. no GPU visible)
    train_dtype: str = "float32"  # the default compute dtype of training
    sharding: bool = False  # --deepspeed / --fsdp
    half_precision_training: bool = False  # fp16 under DeepSpeed
    lora_training: bool = False  # --lora
    qlora: str | None = None  # "quantized_base": LoRA on a quantized MLX base; "nf4": --quantize 4 (bitsandbytes)
    native_layout: str = "official"  # the layout its trainer can also save ("mlx": --save-layout mlx)
    process_group: str | None = None  # "module:Class" of a data-parallel group (torchrun); None: one process

    def load(self, attribute: str = "model") -> Any:
        """The class or function an entry names, imported now."""
        module, _, name = getattr(self, attribute).partition(":")
        return getattr(importlib.import_module(module), name)


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec(
            "mlx", "parrot.backends.mlx.api:MLXParrot", "parrot.backends.mlx.train.loop:run_training",
            ("mlx.core", "parrot.backends.mlx.mlxlm"), "pip install 'parrot-vlm[mlx]'", "mlx", "MLX",
            "MLX (Apple silicon; CPU on Linux)", lora_training=True, qlora="quantized_base", native_layout="mlx",
        ),
        BackendSpec(
            "cpu", "parrot.backends.torch_cuda.api:TorchParrot", "parrot.backends.torch_cuda.train.loop:run_training",
            ("torch", "transformers"), "pip install 'parrot-vlm[torch]'", "torch", "PyTorch", "PyTorch on the CPU",
            device="cpu", sharding=True, lora_training=True,
            process_group="parrot.backends.torch_cuda.group:ProcessGroup",
        ),
        BackendSpec(
            "cuda", "parrot.backends.torch_cuda.api:TorchParrot", "parrot.backends.torch_cuda.train.loop:run_training",
            ("torch", "transformers"), "pip install 'parrot-vlm[torch]'", "torch", "PyTorch", "PyTorch on a CUDA GPU",
            device="cuda", probe="parrot.backends.torch_cuda.device:cuda_problem", train_dtype="bfloat16",
            sharding=True, half_precision_training=True, lora_training=True, qlora="nf4",
            process_group="parrot.backends.torch_cuda.group:ProcessGroup",
        ),
    )
}
NAMES: tuple[str, ...] = tuple(BACKENDS)


def get(name: str) -> BackendSpec:
    """The entry of a backend name; ParrotError naming the choices for an unknown one."""
    if name not in BACKENDS:
        raise ParrotError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    return BACKENDS[name]


def import_problem(*modules: str) -> str | None:
    """Imports them; None when all load, else the first failure. (A package can be found yet fail to
    load, e.g. mlx without its CPU/Metal library.)"""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:  # ImportError, or a broken install raising something else
            return f"{type(e).__name__}: {e}"
    return None


def require(name: str) -> BackendSpec:
    """The entry of a backend that is usable on this machine; else one ParrotError saying what to do."""
    spec = get(name)
    if err := import_problem(*spec.requires):
        raise ParrotError(f"--backend {name} needs {spec.framework}, which is "
                          f"not installed or fails to import ({err}): {spec.install}")
    if spec.probe is not None and (why := spec.load("probe")()):
        others = ", ".join(n for n in NAMES if n != name)
        raise ParrotError(f"--backend {name}: {why}; use --backend {others}")
    return spec


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _cuda_visible() -> bool:
    return BACKENDS["cuda"].load("probe")() is None


# the automatic choice, in order: the first whose test passes
_AUTO: tuple[tuple[str, Callable[[], bool]], ...] = (
    ("mlx", lambda: sys.platform == "darwin" and platform.machine() == "arm64" and _found("mlx")),
    ("cuda", lambda: _found("torch") and _cuda_visible()),
    ("cpu", lambda: _found("torch")),
    ("mlx", lambda: _found("mlx")),
)


def default_backend() -> str:
    """mlx on Apple silicon (when installed), else cuda when a GPU is visible, else cpu (torch); mlx when
    only MLX is installed. `parrot.load` and every command use it when no backend is given."""
    for name, test in _AUTO:
        if test():
            return name
    return "cpu"  # nothing installed: loading will say what to install
