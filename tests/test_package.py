"""Install hygiene: import graph, extras, CLI entry point."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import random_image, requires_mlx, run_parrot, without_packages

ROOT = Path(__file__).resolve().parents[1]


def test_import_parrot_imports_neither_torch_nor_mlx():
    code = "import sys, parrot, parrot.testing, parrot.model.checkpoint; " \
           "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'mlx', 'mlx_lm', 'transformers'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _imports(path: Path, module_level_only: bool = False) -> set[str]:
    names = set()
    tree = ast.parse(path.read_text())
    for node in (tree.body if module_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_dependency_direction():
    """parrot_core imports no backend at module level; the MLX backend never imports torch."""
    for f in (ROOT / "parrot_core").rglob("*.py"):
        top = _imports(f, module_level_only=True) - {"parrot"}
        assert not top & {"torch", "mlx", "mlx_lm", "transformers", "deepspeed"}, f
    for f in (ROOT / "backends" / "mlx").rglob("*.py"):
        assert "torch" not in _imports(f) and "deepspeed" not in _imports(f), f
    for f in (ROOT / "backends" / "torch_cuda").rglob("*.py"):
        assert not _imports(f) & {"mlx", "mlx_lm"}, f


@requires_mlx
def test_mlx_backend_works_without_torch_installed(tiny_ckpt, tmp_path):
    """A Mac with only the [mlx] extra: torch made unimportable, the MLX backend still loads and runs."""
    img = tmp_path / "i.png"
    random_image(10, 13).save(img)
    code = (
        "import sys, parrot; m = parrot.load(sys.argv[1], backend='mlx'); "
        "l = m.logits(m.encode_prompt('hi', True), m.preprocess(sys.argv[2])); "
        "print(l.shape[1], 'torch' in sys.modules)"
    )
    env = {**__import__("os").environ, **without_packages("torch")}
    p = subprocess.run([sys.executable, "-c", code, str(tiny_ckpt), str(img)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["397", "False"]


def test_cli_help_lists_the_command_group():
    p = run_parrot("--help")
    assert p.returncode == 0
    assert "Usage: parrot" in p.stdout and "Commands" in p.stdout
    assert run_parrot("--version").stdout.strip().endswith("0.1.0")


def test_backend_without_package_is_a_clear_error(tiny_ckpt):
    code = "import sys, parrot; parrot.load(sys.argv[1], backend='mlx')"
    env = {**__import__("os").environ, **without_packages("mlx")}
    p = subprocess.run([sys.executable, "-c", code, str(tiny_ckpt)], capture_output=True, text=True, env=env)
    assert p.returncode != 0 and "needs MLX, which is not installed" in p.stderr


def test_modules_moved_into_subpackages_still_import_under_their_old_names():
    """0.1's flat module names (`parrot.config`, `parrot.generation`, ...) are aliases of the new modules."""
    code = ("import parrot.config, parrot.model.config, parrot.train_config, parrot.training.config, parrot.fsutil\n"
            "from parrot.safetensors_io import SafetensorsFile\n"
            "from parrot.storage.safetensors_io import SafetensorsFile as S\n"
            "assert parrot.config is parrot.model.config and SafetensorsFile is S\n"
            "assert parrot.train_config.TrainConfig is parrot.training.config.TrainConfig\n"
            "from parrot.training import train\n"
            "import sys; assert 'torch' not in sys.modules and 'mlx' not in sys.modules\n"
            "print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
