"""The layering of docs/architecture.md, checked on the source: no import cycles, imports only downward,
backend names compared only in the registry and the backends themselves."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> import package (pyproject.toml's package-dir)
PACKAGES = {"parrot_core": "parrot", "backends": "parrot.backends", "convert": "parrot.convert", "cli": "parrot.cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every parrot module `name` imports, at any depth of its code (lazy imports count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_anywhere_in_the_package():
    graph = _graph()
    # a package's __init__ re-exporting its modules is not a cycle of design: leave those edges out
    acyclic = {m: {d for d in deps if not d.startswith(m + ".") or (m + ".") not in d} for m, deps in graph.items()}
    assert _cycles(acyclic) == []


def _violations(source: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} imports {d}" for m, deps in _graph().items() if m.startswith(source)
                  for d in deps if d.startswith(forbidden))


def test_imports_point_down_the_layers():
    core = tuple(f"parrot.{p}" for p in ("backends", "convert", "cli"))
    assert [v for v in _violations("parrot", core)
            if v.split()[0].startswith("parrot.") and not v.split()[0].startswith(core)] == []
    assert _violations("parrot.backends", ("parrot.cli", "parrot.convert")) == []
    assert _violations("parrot.convert", ("parrot.cli",)) == []
    assert _violations("parrot.backends.mlx", ("parrot.backends.torch_cuda",)) == []
    assert _violations("parrot.backends.torch_cuda", ("parrot.backends.mlx",)) == []


def _third_party(folder: str) -> set[str]:
    out = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                out.add(node.module.split(".")[0])
    return out


def test_core_imports_neither_torch_nor_mlx_and_mlx_backend_never_torch():
    assert not {"torch", "mlx", "mlx_lm", "transformers"} & _third_party("parrot_core")
    assert not {"torch", "transformers", "deepspeed"} & _third_party("backends/mlx")
    assert not {"mlx", "mlx_lm"} & _third_party("backends/torch_cuda")


NAME_COMPARISON = re.compile(
    r"""backend\w*\s*(==|!=)\s*["'](mlx|cpu|cuda)["']|["'](mlx|cpu|cuda)["']\s*(==|!=)\s*\w*backend"""
    r"""|backend\w*\s+(not\s+)?in\s*[(\[{]\s*["'](mlx|cpu|cuda)["']""")


def test_backend_names_are_compared_only_in_the_registry_and_the_backends():
    """grep: `backend == "mlx"`, `"cuda" != backend`, `backend in ("cpu", ...)` outside parrot_core/registry.py
    and backends/."""
    hits = []
    for folder in ("parrot_core", "cli", "convert", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "parrot_core" / "registry.py":
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if NAME_COMPARISON.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert hits == []
