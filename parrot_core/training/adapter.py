"""LoRA adapters, backend-agnostic: the `--lora-*` settings, the modules they adapt, the initial
adapter weights (drawn here, once, from the run's seed: both backends start from them), the adapter
directory in mlx-lm's format (`adapters.safetensors` + `adapter_config.json`) or PEFT's
(`adapter_model.safetensors` + PEFT's `adapter_config.json`, see `peft_format`), the checks against a
base model, and the fused weights W + scale * (A B)^T in numpy.

An adapted module is a Linear `y = x W^T + scale * (x A) B` with A [in, r] and B [r, out]
(mlx-lm's LoRALinear; PEFT's lora_A.weight is A^T, lora_B.weight is B^T, scaling = alpha / r).
Adapter tensors are named `<MLX module path>.lora_a|lora_b`, so a module's official weight key is
`mlx_to_official_key(path + ".weight")`. As LLaVA's LoRA recipe, a run also trains the projector
and the MoE fully (unless --lora-only); those tensors travel with the adapter (`Adapter.full`, MLX
names, as mlx-lm saves every trainable parameter in adapters.safetensors). The MLX backend applies
adapters as LoRA layers (a quantized base stays quantized); the torch backend and `parrot convert
--fuse-adapter` add the delta to the base weights.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ParrotError
from ..model.layout import mlx_to_official_array, mlx_to_official_key
from ..model.schema import ADAPTER_CONFIG as ADAPTER_CONFIG_SCHEMA
from ..model.schema import check, parse_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
FORMATS = ("mlx-lm", "peft")
FORMAT_VERSION = 1
LORA_FIELDS = ("lora_rank", "lora_scale", "lora_alpha", "lora_dropout", "lora_targets", "lora_layers")
FULL_MODULES = ("mm_projector", "moe_model")  # trained fully beside the adapters (LLaVA's LoRA recipe)
DEFAULT_RANK, DEFAULT_SCALE, DEFAULT_DROPOUT = 8, 20.0, 0.0  # mlx-lm's defaults
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGETS = (*ATTENTION, *MLP, "experts", "projector")
ALIASES = {"attention": ATTENTION, "attn": ATTENTION, "mlp": MLP}
DEFAULT_TARGETS = [*ATTENTION, *MLP]
# the base's dimensions an adapter records and must find again
BASE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "mm_hidden_size", "num_experts", "moe_intermediate_size")


# ---------------------------------------------------------------- settings
def parse_targets(targets: Iterable[str] | str | None) -> list[str]:
    """Target names (comma-separated or a list; `attention` / `mlp` expand), in canonical order."""
    if targets is None:
        return list(DEFAULT_TARGETS)
    items = targets.split(",") if isinstance(targets, str) else [t for x in targets for t in str(x).split(",")]
    names: set[str] = set()
    for t in (x.strip() for x in items):
        if not t:
            continue
        if t in ALIASES:
            names.update(ALIASES[t])
        elif t in TARGETS:
            names.add(t)
        else:
            raise ParrotError(f"--lora-targets: unknown target {t!r}; choose from {', '.join(TARGETS)} "
                              "(or attention, mlp)")
    if not names:
        raise ParrotError("--lora-targets is empty; name at least one module (e.g. q_proj,v_proj)")
    return [t for t in TARGETS if t in names]


def resolve_lora(rank: int | None, scale: float | None, alpha: float | None, dropout: float | None,
                 targets: Iterable[str] | str | None) -> dict[str, Any]:
    """The LoRA settings with mlx-lm's defaults (rank 8, scale 20, dropout 0), validated.

    `alpha` (PEFT's convention) sets scale = alpha / rank; giving both disagreeing values is an error."""
    rank = DEFAULT_RANK if rank is None else int(rank)
    if rank < 1:
        raise ParrotError(f"--lora-rank must be at least 1, not {rank}")
    if alpha is not None:
        if scale is not None and abs(scale - alpha / rank) > 1e-12 * max(1.0, abs(scale)):
            raise ParrotError("give --lora-scale (mlx-lm: the factor itself) or --lora-alpha (PEFT: scale = "
                              "alpha / rank), not both")
        scale = alpha / rank
    scale = DEFAULT_SCALE if scale is None else float(scale)
    dropout = DEFAULT_DROPOUT if dropout is None else float(dropout)
    if not 0.0 <= dropout < 1.0:
        raise ParrotError(f"--lora-dropout must be in [0, 1), not {dropout}")
    return {"lora_rank": rank, "lora_scale": scale, "lora_alpha": alpha, "lora_dropout": dropout,
            "lora_targets": parse_targets(targets)}


def target_modules(cfg, targets: Iterable[str], num_layers: int | None = None) -> list[str]:
    """MLX module paths the targets name on a model with config `cfg` (a ParrotConfig): the last
    `num_layers` LLM layers (all when None), the MoE experts, the projector's linear layers."""
    targets = list(targets)
    n = cfg.num_hidden_layers
    first = 0 if num_layers is None else max(0, n - num_layers)
    paths = []
    for i in range(first, n):
        for t in targets:
            if t in ATTENTION:
                paths.append(f"language_model.model.layers.{i}.self_attn.{t}")
            elif t in MLP:
                paths.append(f"language_model.model.layers.{i}.mlp.{t}")
    if "experts" in targets:
        if not cfg.moe_active:
            raise ParrotError("--lora-targets experts: this model runs without the MoE (stage 1 or --no-moe)")
        paths += [f"moe_model.experts.{e}.{p}" for e in range(cfg.num_experts) for p in MLP]
    if "projector" in targets:
        paths += [f"mm_projector.{2 * i}" for i in range(cfg.projector_depth)]
    return paths


def full_modules(cfg, targets: Iterable[str], lora_only: bool = False) -> list[str]:
    """MLX module prefixes trained fully beside the adapters: the projector (unless it gets LoRA) and the
    MoE when it runs (unless its experts get LoRA); none with --lora-only."""
    if lora_only:
        return []
    targets = list(targets)
    out = [] if "projector" in targets else ["mm_projector"]
    if cfg.moe_active and "experts" not in targets:
        out.append("moe_model")
    return out


def init_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, np.ndarray]:
    """The adapters' initial weights, the same on every backend: A ~ U(-1/sqrt(in), 1/sqrt(in)) [in, r]
    (mlx-lm's LoRALinear init; PEFT's kaiming_uniform(a=sqrt(5)) has the same bound), B = 0 [r, out].

    shapes: module path -> (in, out). Each module draws from its own stream (seed, crc32 of its path),
    so the values do not depend on the order the modules are listed in."""
    out = {}
    for m, (n_in, n_out) in shapes.items():
        rng = np.random.default_rng([seed, zlib.crc32(m.encode())])
        bound = 1.0 / np.sqrt(n_in)
        out[f"{m}.lora_a"] = rng.uniform(-bound, bound, size=(n_in, rank)).astype(np.float32)
        out[f"{m}.lora_b"] = np.zeros((rank, n_out), np.float32)
    return out


def is_full_tensor(name: str) -> bool:
    """Whether an adapter tensor name is a fully trained parameter (not lora_a / lora_b)."""
    return name.rsplit(".", 1)[-1] not in ("lora_a", "lora_b")


# ---------------------------------------------------------------- the adapter directory
@dataclass
class Adapter:
    path: Path
    rank: int
    scale: float
    dropout: float
    modules: list[str]  # MLX module paths
    weights: dict[str, np.ndarray]  # "<path>.lora_a" [in, r], "<path>.lora_b" [r, out], float32
    config: dict[str, Any] = field(default_factory=dict)  # adapter_config.json (mlx-lm's fields) as read or built
    full: dict[str, np.ndarray] = field(default_factory=dict)  # fully trained parameters, MLX names
    format: str = "mlx-lm"  # the format it was read from

    @property
    def use_moe(self) -> bool | None:
        """Whether the adapter was trained with the MoE active (None: not recorded)."""
        return self.config.get("parrot", {}).get("use_moe")

    @property
    def base(self) -> dict[str, Any]:
        return self.config.get("parrot", {}).get("base", {})

    def official_keys(self) -> dict[str, str]:
        """Official weight key -> module path, for every adapted module."""
        return {mlx_to_official_key(f"{m}.weight"): m for m in self.modules}

    def official_full(self) -> dict[str, np.ndarray]:
        """The fully trained tensors by official key, in the official layout."""
        return {(ok := mlx_to_official_key(k)): mlx_to_official_array(ok, v) for k, v in self.full.items()}

    def delta(self, module: str) -> np.ndarray:
        """scale * (A B)^T: float32 [out, in], what the adapter adds to the module's weight."""
        a = self.weights[f"{module}.lora_a"].astype(np.float32)
        b = self.weights[f"{module}.lora_b"].astype(np.float32)
        return (np.float32(self.scale) * (a @ b)).T


def adapter_config(rank: int, scale: float, dropout: float, alpha: float | None, targets: list[str],
                   modules: list[str], base_cfg, base_path: str, num_layers: int | None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """mlx-lm's adapter_config.json fields, plus what rebuilding the adapter on a base needs."""
    keys = sorted({m.split(".", 4)[4] for m in modules if m.startswith("language_model.model.layers.")})
    layers = {int(m.split(".")[3]) for m in modules if m.startswith("language_model.model.layers.")}
    return {
        "fine_tune_type": "lora",
        "model": base_path,
        "num_layers": num_layers if num_layers is not None else len(layers),
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": keys},
        "parrot": {
            "format": FORMAT_VERSION, "alpha": alpha, "targets": targets, "modules": modules,
            "base": {k: getattr(base_cfg, k) for k in BASE_FIELDS},
            "base_quantization": base_cfg.quantization, **(extra or {}),
        },
    }


def save_adapter(directory: Path, config: dict[str, Any], weights: dict[str, np.ndarray],
                 full: dict[str, np.ndarray] | None = None, fmt: str = "mlx-lm") -> None:
    """Writes the adapter (LoRA pairs plus the fully trained tensors, MLX names) into `directory` in
    mlx-lm's format (adapters.safetensors, then adapter_config.json) or PEFT's, each file atomically."""
    from ..storage.fsutil import atomic_output_file
    from ..storage.safetensors_io import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "peft":
        from .peft_format import write_peft

        write_peft(directory, config, weights, full or {})
        return
    tensors = {**weights, **(full or {})}
    save_file({k: np.asarray(v, dtype=np.float32) for k, v in sorted(tensors.items())}, directory / ADAPTER_WEIGHTS,
              metadata={"format": "mlx"})
    with atomic_output_file(directory / ADAPTER_CONFIG) as f:
        f.write(json.dumps(config, indent=2) + "\n")


def write_adapter(adapter: Adapter, directory: Path, fmt: str) -> None:
    """An adapter (as read) written in `fmt` ("mlx-lm" or "peft"): `parrot convert --adapter-format`."""
    save_adapter(directory, adapter.config, adapter.weights, adapter.full, fmt)


def read_adapter(path: str | Path) -> Adapter:
    """An adapter directory in mlx-lm's or PEFT's format, validated (config fields, tensor names, pairs, ranks)."""
    from ..storage.safetensors_io import SafetensorsFile
    from .peft_format import PEFT_WEIGHTS, read_peft

    d = Path(path)
    if not d.is_dir():
        raise ParrotError(f"--adapter {d}: not found (expected a directory with {ADAPTER_CONFIG} and "
                          f"{ADAPTER_WEIGHTS} or {PEFT_WEIGHTS}, e.g. the --output of `parrot train --lora`)")
    cfg_path = d / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise ParrotError(f"--adapter {d}: no {ADAPTER_CONFIG} (is it a LoRA adapter directory?)")
    cfg = parse_json(cfg_path.read_bytes(), str(cfg_path))
    if isinstance(cfg, dict) and "peft_type" in cfg:
        return _validated(Adapter(**read_peft(d, cfg)))
    check(cfg, ADAPTER_CONFIG_SCHEMA, str(cfg_path))
    lp = cfg["lora_parameters"]
    rank, scale, dropout = lp["rank"], float(lp["scale"]), float(lp.get("dropout", 0.0))
    if cfg.get("fine_tune_type", "lora") != "lora":
        raise ParrotError(f"{cfg_path}: fine_tune_type {cfg.get('fine_tune_type')!r}; only LoRA adapters apply")
    wpath = d / ADAPTER_WEIGHTS
    if not wpath.is_file():
        raise ParrotError(f"--adapter {d}: no {ADAPTER_WEIGHTS}")
    tensors = SafetensorsFile(wpath).read_all()
    weights = {k: v for k, v in tensors.items() if not is_full_tensor(k)}
    full = {k: v for k, v in tensors.items() if is_full_tensor(k)}
    modules = sorted({k.rsplit(".", 1)[0] for k in weights})
    return _validated(Adapter(d, rank, scale, dropout, modules, weights, cfg, full, "mlx-lm"), wpath)


def _validated(adapter: Adapter, where: Path | None = None) -> Adapter:
    """Checks the pairs, ranks and names of an adapter's tensors."""
    where = where or adapter.path
    rank, weights = adapter.rank, adapter.weights
    for m in adapter.modules:
        a, b = weights.get(f"{m}.lora_a"), weights.get(f"{m}.lora_b")
        if a is None or b is None or len(weights) != 2 * len(adapter.modules):
            raise ParrotError(f"{where}: tensors must come in <module>.lora_a / <module>.lora_b pairs ({m})")
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != rank or b.shape[0] != rank:
            raise ParrotError(f"{where}: {m} has lora_a {a.shape} and lora_b {b.shape}, not rank {rank}")
        try:
            mlx_to_official_key(f"{m}.weight")
        except ParrotError:
            raise ParrotError(f"{where}: {m} is not a Parrot module") from None
    for k in adapter.full:
        if not k.startswith(tuple(f"{p}." for p in FULL_MODULES)):
            raise ParrotError(f"{where}: {k} is neither a LoRA tensor nor a projector / MoE parameter")
    if not adapter.modules:
        raise ParrotError(f"{where}: holds no adapter tensors")
    return adapter


def fit_base(adapter: Adapter, cfg, shapes: dict[str, tuple[int, ...]], model: str) -> None:
    """Refuses a base whose dimensions or module shapes differ from the adapter's base, and runs
    the base's MoE as the adapter was trained (`cfg.use_moe` set from the adapter's record).

    shapes: official key -> float shape of the base (its manifest)."""
    where = f"--adapter {adapter.path} does not fit --model {model}"
    if adapter.use_moe is not None:
        if adapter.use_moe and not cfg.has_moe:
            raise ParrotError(f"{where}: the adapter was trained with the MoE, this model has no MoE weights")
        cfg.use_moe = bool(adapter.use_moe)
    for k, v in adapter.base.items():
        if k in BASE_FIELDS and getattr(cfg, k, None) != v:
            raise ParrotError(f"{where}: the adapter was trained on a base with {k} {v}, this model has "
                              f"{getattr(cfg, k, None)}. Use the base it was trained on "
                              f"({adapter.config.get('model')}).")
    for key, m in adapter.official_keys().items():
        if m.startswith("moe_model.") and not cfg.moe_active:
            raise ParrotError(f"{where}: the adapter adapts the MoE experts but this model runs without the MoE")
        shape = shapes.get(key)
        a, b = adapter.weights[f"{m}.lora_a"], adapter.weights[f"{m}.lora_b"]
        if shape is None or tuple(shape) != (b.shape[1], a.shape[0]):
            raise ParrotError(f"{where}: {m} needs a weight of shape {(b.shape[1], a.shape[0])}, the model has "
                              f"{None if shape is None else tuple(shape)}")
    for key, a in adapter.official_full().items():
        if key.startswith("model.moe_model.") and not cfg.moe_active:
            raise ParrotError(f"{where}: the adapter holds trained MoE weights but this model runs without the MoE")
        shape = shapes.get(key)
        if shape is None or tuple(shape) != tuple(a.shape):
            raise ParrotError(f"{where}: the adapter's {key} has shape {tuple(a.shape)}, the model "
                              f"{None if shape is None else tuple(shape)}")


def fuse_official(tensors: Iterable[tuple[str, np.ndarray]], adapter: Adapter) -> Iterator[tuple[str, np.ndarray]]:
    """Official-layout tensors with the adapter's deltas added (in float32, then cast back), and its fully
    trained tensors in place of the base's."""
    keys, full = adapter.official_keys(), adapter.official_full()
    for k, a in tensors:
        m = keys.get(k)
        if k in full:
            a = full[k].astype(a.dtype)
        if m is not None:
            a = (a.astype(np.float32) + adapter.delta(m)).astype(a.dtype)
        yield k, a
