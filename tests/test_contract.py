"""The backend contract (parrot.contract) and the registry (parrot.registry): one signature per method,
every backend implementing all of it, names listed once."""

from __future__ import annotations

import inspect
import sys

import pytest

from conftest import HAS_MLX, HAS_TORCH
from parrot import registry
from parrot.api import ParrotModel
from parrot.contract import ModelBackend, contract_methods
from parrot.errors import ParrotError

AVAILABLE = [n for n, s in registry.BACKENDS.items() if (HAS_MLX if s.family == "mlx" else HAS_TORCH)]


def _signature(f) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]


def test_the_contract_declares_every_method_shared_code_calls():
    names = contract_methods()
    assert len(names) == len(set(names)) >= 15
    for name in ("image_features", "expert_outputs", "embed_prompt", "embed_tokens", "forward_embeddings",
                 "batch_logits", "new_cache", "cache_length", "trim_cache", "generate_tokens",
                 "generate_tokens_batch", "evaluate", "reset_peak_memory", "peak_memory", "to_numpy"):
        assert name in names, name
        assert getattr(ModelBackend, name).__doc__, f"{name} is documented"
    assert issubclass(ParrotModel, ModelBackend)


@pytest.mark.parametrize("name", AVAILABLE)
def test_each_backend_implements_every_contract_method_with_its_signature(name):
    cls = registry.get(name).load("model")
    assert issubclass(cls, ParrotModel) and not inspect.isabstract(cls)
    for method in contract_methods():
        impl = getattr(cls, method)
        assert impl is not getattr(ModelBackend, method), f"{cls.__name__} does not implement {method}"
        assert _signature(impl) == _signature(getattr(ModelBackend, method)), (cls.__name__, method)


@pytest.mark.skipif(not (HAS_MLX and HAS_TORCH), reason="needs both backends installed")
def test_both_backends_share_one_constructor_and_model_class_layout():
    """The two model files mirror each other: same top-level class, same methods in the same order."""
    from parrot.backends.mlx import model as mlx_model
    from parrot.backends.torch_cuda import model as torch_model

    def methods(cls):
        return [n for n, f in vars(cls).items() if (callable(f) or isinstance(f, staticmethod)) and n[0] != "_"]

    t, m = torch_model.ParrotForCausalLM, mlx_model.ParrotForCausalLM
    shared = ["encode_images", "apply_moe", "expert_outputs", "embed_tokens", "splice", "place", "hidden_states",
              "lm_logits"]
    assert [n for n in methods(t) if n in shared] == shared
    assert [n for n in methods(m) if n in shared] == shared
    for name in ("VisionTower", "Expert", "MultilingualMoE"):
        assert hasattr(torch_model, name) and hasattr(mlx_model, name)
    t_api, m_api = (registry.get(n).load("model") for n in ("cpu", "mlx"))
    assert _signature(t_api.__init__) == _signature(m_api.__init__)


def test_registry_entries_name_importable_pieces_and_unknown_names_fail_clearly():
    for spec in registry.BACKENDS.values():
        assert ":" in spec.model and ":" in spec.trainer and spec.requires and spec.install.startswith("pip install")
    assert registry.NAMES == ("mlx", "cpu", "cuda")
    with pytest.raises(ParrotError, match=r"unknown backend 'tpu'; choose one of mlx, cpu, cuda"):
        registry.get("tpu")
    for name in AVAILABLE:
        spec = registry.get(name)
        assert callable(spec.load("trainer"))


@pytest.mark.parametrize("platform_, machine, found, cuda, want", [
    ("darwin", "arm64", {"mlx", "torch"}, False, "mlx"),
    ("darwin", "arm64", {"torch"}, False, "cpu"),
    ("linux", "x86_64", {"mlx", "torch"}, True, "cuda"),
    ("linux", "x86_64", {"mlx", "torch"}, False, "cpu"),
    ("linux", "x86_64", {"mlx"}, False, "mlx"),
    ("linux", "x86_64", set(), False, "cpu"),
])
def test_default_backend_is_mlx_on_apple_silicon_then_cuda_then_cpu(monkeypatch, platform_, machine, found, cuda,
                                                                    want):
    monkeypatch.setattr(sys, "platform", platform_)
    monkeypatch.setattr(registry.platform, "machine", lambda: machine)
    monkeypatch.setattr(registry, "_found", lambda m: m in found)
    monkeypatch.setattr(registry, "_cuda_visible", lambda: cuda)
    assert registry.default_backend() == want


def test_parrot_load_defaults_to_the_automatic_choice(monkeypatch, tmp_path):
    """parrot.load without a backend asks the registry (as every command does)."""
    import parrot

    asked = []
    monkeypatch.setattr(registry, "default_backend", lambda: asked.append(1) or "tpu")
    with pytest.raises(ParrotError, match="unknown backend 'tpu'"):
        parrot.load(tmp_path)
    assert asked == [1]
