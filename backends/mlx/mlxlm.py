"""What the MLX backend takes from mlx-lm, imported without torch.

We use three pure-MLX modules of mlx-lm: the Qwen2 model (`mlx_lm.models.qwen2`), its KV caches
(`mlx_lm.models.cache`) and `LoRALinear` (`mlx_lm.tuner.lora`). But Python runs a package's
`__init__` before any of its submodules, and `mlx_lm/__init__.py` imports `mlx_lm.convert`,
`generate` and `utils`, which import transformers, which imports torch when it is installed:
about 3 s of start-up for every MLX command on a machine that has torch (`mlx_lm/tuner/__init__.py`
does the same through its trainer). Neither mlx-lm nor transformers 5 has a switch for this.

So `import_without_package_init` imports such a submodule with the parent package present in
`sys.modules` as a bare module object (its spec and `__path__`, its `__init__` not run), and
removes that placeholder as soon as the import is done. Rewriting the Qwen2 model, the caches and
LoRALinear ourselves would fork about 700 lines of well-kept code and lose the parity with mlx-lm
that the tests and benchmarks rely on; the placeholder lives only while the import runs. What stays
in `sys.modules` afterwards is what an ordinary import leaves (the submodules); a later
`import mlx_lm` runs the real `__init__` and reuses them (same classes). One difference remains: that
later `mlx_lm` package object lacks the attribute `models` (use `from mlx_lm.models import qwen2`,
not `mlx_lm.models.qwen2` as an attribute chain).

`wired_limit` is our own version of the context manager of `mlx_lm.generate` (which imports
transformers at module level): on Metal, weights stay resident (wired) while generating.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_reduce

# packages whose __init__ imports transformers (and so torch); their pure-MLX submodules are what we use
HEAVY_PACKAGES = ("mlx_lm", "mlx_lm.tuner")


def import_without_package_init(name: str) -> ModuleType:
    """Imports the module `name` without running the `__init__` of its parents in HEAVY_PACKAGES
    (those already imported are used as they are)."""
    if name in sys.modules:
        return sys.modules[name]
    placed: dict[str, ModuleType] = {}
    try:
        for package in HEAVY_PACKAGES:  # parents first: a subpackage's spec is found on its parent's __path__
            if name.startswith(package + ".") and package not in sys.modules:
                spec = importlib.util.find_spec(package)
                if spec is None:
                    raise ModuleNotFoundError(f"No module named {package!r}", name=package)
                placed[package] = sys.modules[package] = importlib.util.module_from_spec(spec)
        return importlib.import_module(name)
    finally:
        for package, module in placed.items():
            if sys.modules.get(package) is module:
                del sys.modules[package]


qwen2 = import_without_package_init("mlx_lm.models.qwen2")
_cache = import_without_package_init("mlx_lm.models.cache")
BatchKVCache = _cache.BatchKVCache
make_prompt_cache = _cache.make_prompt_cache
LoRALinear = import_without_package_init("mlx_lm.tuner.lora").LoRALinear


@contextmanager
def wired_limit(model: nn.Module, streams: Sequence[mx.Stream] = ()) -> Iterator[None]:
    """Raises MLX's wired-memory limit to the device's recommended working set while the block runs
    (Metal only: elsewhere the device reports none and nothing changes), as mlx-lm's generation does;
    the streams are synchronized before the old limit comes back."""
    recommended = mx.device_info().get("max_recommended_working_set_size")
    if recommended is None:
        yield
        return
    weight_bytes = tree_reduce(lambda n, x: n + x.nbytes if isinstance(x, mx.array) else n, model, 0)
    if weight_bytes > 0.9 * recommended:
        print(f"Warning: the model's weights ({weight_bytes >> 20} MB) are close to the recommended working set "
              f"({recommended >> 20} MB): generation may be slow", file=sys.stderr)
    previous = mx.set_wired_limit(recommended)
    try:
        yield
    finally:
        for s in streams:
            mx.synchronize(s)
        mx.set_wired_limit(previous)
