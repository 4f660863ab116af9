"""Parrot: the multilingual vision-language model with PyTorch and MLX backends.

`import parrot` imports neither torch nor mlx; `parrot.load(..., backend=...)` imports the chosen
backend lazily. The package's parts (docs/architecture.md): `model` (the spec and checkpoint layout),
`inference`, `training`, `storage`, `eval`, the backend `contract` and `registry`.
"""

import importlib.abc
import importlib.util
import sys

from .api import BACKENDS, ParrotModel, load
from .constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .errors import ParrotError
from .model.config import ParrotConfig, VisionConfig

__version__ = "0.1.0"
__all__ = [
    "BACKENDS", "IGNORE_INDEX", "IMAGE_TOKEN_INDEX", "ParrotConfig", "ParrotError", "ParrotModel",
    "VisionConfig", "load", "__version__",
]


# Modules that moved into subpackages keep importing under their old names (`parrot.config` is
# `parrot.model.config`, ...): aliases of the new modules, so code written against 0.1 still runs.
_MOVED = {
    "config": "model.config", "layout": "model.layout", "manifest": "model.manifest",
    "checkpoint": "model.checkpoint", "tower": "model.tower", "image": "model.image", "prompt": "model.prompt",
    "tokenizer": "model.tokenizer", "generation": "inference.generation", "detokenizer": "inference.detokenizer",
    "batch": "inference.batch", "chat": "inference.chat", "answers": "inference.answers", "bench": "inference.bench",
    "data": "training.data", "train_config": "training.config", "schedule": "training.schedule",
    "run_dir": "training.run_dir", "adapter": "training.adapter", "train_source": "training.source",
    "ds_config": "training.ds_config", "safetensors_io": "storage.safetensors_io", "hub": "storage.hub",
    "fsutil": "storage.fsutil", "schema": "model.schema", "splice": "model.splice", "train_loop": "training.loop",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        return importlib.util.spec_from_loader(fullname, self) if package == __name__ and name in _MOVED else None

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.{_MOVED[spec.name.rpartition('.')[2]]}")

    def exec_module(self, module) -> None:
        pass


sys.meta_path.append(_MovedModules())
