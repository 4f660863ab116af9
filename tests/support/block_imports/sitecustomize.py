"""Makes the packages named in PARROT_TEST_BLOCK (comma-separated) look uninstalled.

Put this folder on PYTHONPATH of a subprocess to simulate, e.g., a Mac without torch
(PARROT_TEST_BLOCK=torch) or a machine without MLX (PARROT_TEST_BLOCK=mlx).
"""

import importlib.util
import os
import sys

_BLOCKED = tuple(p for p in os.environ.get("PARROT_TEST_BLOCK", "").split(",") if p)
_real_find_spec = importlib.util.find_spec


def _blocked(name: str) -> bool:
    return name.split(".")[0] in _BLOCKED


def find_spec(name, package=None):
    return None if _blocked(name) else _real_find_spec(name, package)


class _Block:
    def find_spec(self, name, path=None, target=None):
        if _blocked(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


if _BLOCKED:
    importlib.util.find_spec = find_spec
    sys.meta_path.insert(0, _Block())
