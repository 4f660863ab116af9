"""PEFT's adapter format, in numpy: `adapter_model.safetensors` + PEFT's `adapter_config.json`.

What PEFT's `PeftModel.save_pretrained` writes for a LoRA on a model whose modules carry the official
names (ours on torch, transformers' Qwen2ForCausalLM for the LLM part):
`base_model.model.<module>.lora_A.weight` [r, in] (= A^T), `...lora_B.weight` [out, r] (= B^T),
fully trained modules (`modules_to_save`) as `base_model.model.<official key>`; the config's
`lora_alpha` / `r` is the scale (`use_rslora`: alpha / sqrt(r)). Our own record (base dimensions,
targets, MoE use; the exact scale) rides in the safetensors header's metadata, which PEFT ignores, so
ours -> PEFT -> ours is lossless. A PEFT adapter written elsewhere (no record) is read from its
config and tensor names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ParrotError
from ..model.layout import mlx_to_official_key, official_to_mlx_array, official_to_mlx_key
from ..model.schema import ADAPTER_CONFIG, check

PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
RECORD = "parrot_adapter_config"  # safetensors metadata key: our adapter_config (mlx-lm fields + "parrot")
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False}


def peft_module(module: str) -> str:
    """PEFT's (= the torch model's) name of an MLX module path."""
    return mlx_to_official_key(f"{module}.weight")[: -len(".weight")]


def peft_config(config: dict[str, Any], modules: list[str], full: list[str]) -> dict[str, Any]:
    """PEFT's LoraConfig fields (peft 0.17-0.19 write these) for our adapter_config `config`."""
    lp, rec = config["lora_parameters"], config.get("parrot", {})
    rank = int(lp["rank"])
    alpha = rec.get("alpha")
    prefixes = sorted({".".join(mlx_to_official_key(k).split(".")[:2]) for k in full})  # model.mm_projector
    return {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": config.get("model"), "bias": "none",
        "corda_config": None, "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "layer_replication": None, "layers_pattern": None,
        "layers_to_transform": None, "loftq_config": {}, "lora_alpha": float(alpha if alpha is not None
                                                                            else lp["scale"] * rank),
        "lora_bias": False, "lora_dropout": float(lp.get("dropout", 0.0)), "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": prefixes or None, "peft_type": "LORA", "r": rank,
        "rank_pattern": {}, "revision": None, "target_modules": sorted(peft_module(m) for m in modules),
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
    }


def write_peft(directory: Path, config: dict[str, Any], weights: dict[str, np.ndarray],
               full: dict[str, np.ndarray]) -> None:
    """adapter_model.safetensors, then adapter_config.json (each atomically), as PEFT writes them."""
    from ..storage.fsutil import atomic_output_file
    from ..storage.safetensors_io import save_file

    modules = sorted({k.rsplit(".", 1)[0] for k in weights})
    tensors = {}
    for m in modules:
        name = PREFIX + peft_module(m)
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(weights[f"{m}.lora_a"].T, dtype=np.float32)
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(weights[f"{m}.lora_b"].T, dtype=np.float32)
    for k, v in full.items():
        ok = mlx_to_official_key(k)
        tensors[PREFIX + ok] = np.asarray(v, dtype=np.float32)
    save_file(dict(sorted(tensors.items())), Path(directory) / PEFT_WEIGHTS,
              metadata={"format": "pt", RECORD: json.dumps(config, sort_keys=True)})
    with atomic_output_file(Path(directory) / "adapter_config.json") as f:
        f.write(json.dumps(peft_config(config, modules, list(full)), indent=2, sort_keys=True))


def read_peft(directory: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """A PEFT LoRA adapter directory as the fields of an `adapter.Adapter` (MLX names, A [in, r], B [r, out])."""
    from ..storage.safetensors_io import SafetensorsFile

    where = Path(directory) / "adapter_config.json"
    if cfg.get("peft_type") != "LORA":
        raise ParrotError(f"{where}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters apply")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, int | float) \
            or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ParrotError(f"{where}: needs an integer r >= 1 and a number lora_alpha (got r {r!r}, "
                          f"lora_alpha {alpha!r})")
    dropout = cfg.get("lora_dropout") or 0.0
    if not isinstance(dropout, int | float) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ParrotError(f"{where}: lora_dropout {dropout!r}; expected a number in [0, 1)")
    for k, ok in UNSUPPORTED.items():
        if cfg.get(k, ok) != ok:
            raise ParrotError(f"{where}: {k} {cfg[k]!r} is not supported (plain LoRA only)")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("bias", "none") != "none":
        raise ParrotError(f"{where}: per-module ranks / alphas and trained biases are not supported")
    wpath = Path(directory) / PEFT_WEIGHTS
    if not wpath.is_file():
        raise ParrotError(f"--adapter {directory}: no {PEFT_WEIGHTS}")
    f = SafetensorsFile(wpath)
    weights, full = {}, {}
    for key, a in f.read_all().items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(".default.", ".")  # an adapter name left in (older writers)
        try:
            if name.endswith((".lora_A.weight", ".lora_B.weight")):
                module, part = name[: -len(".lora_A.weight")], name[-len("A.weight")]
                m = official_to_mlx_key(f"{module}.weight")[: -len(".weight")]
                weights[f"{m}.lora_{part.lower()}"] = np.ascontiguousarray(a.T, dtype=np.float32)
            else:
                full[official_to_mlx_key(name)] = official_to_mlx_array(name, a.astype(np.float32))
        except ParrotError:
            raise ParrotError(f"{wpath}: {key} is not a Parrot module's tensor") from None
    scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    record = f.metadata.get(RECORD)
    if record is not None:
        try:
            config = json.loads(record)
        except ValueError:
            raise ParrotError(f"{wpath}: corrupt {RECORD} metadata (not JSON)") from None
        check(config, ADAPTER_CONFIG, f"{wpath} ({RECORD} metadata)")
        lp = config["lora_parameters"]
        if int(lp["rank"]) != r or abs(float(lp["scale"]) - scale) > 1e-6 * max(1.0, abs(scale)):
            raise ParrotError(f"{wpath}: its record (rank {lp['rank']}, scale {lp['scale']}) disagrees with "
                              f"adapter_config.json (r {r}, lora_alpha {alpha})")
        scale = float(lp["scale"])
    else:
        modules = sorted({k.rsplit(".", 1)[0] for k in weights})
        layers = {int(m.split(".")[3]) for m in modules if m.startswith("language_model.model.layers.")}
        config = {"fine_tune_type": "lora", "model": cfg.get("base_model_name_or_path"), "num_layers": len(layers),
                  "lora_parameters": {"rank": r, "scale": scale, "dropout": float(dropout),
                                      "keys": sorted({m.split(".", 4)[4] for m in modules
                                                      if m.startswith("language_model.model.layers.")})},
                  "parrot": {"format": 1, "alpha": float(alpha), "modules": modules}}
    modules = sorted({k.rsplit(".", 1)[0] for k in weights})
    return {"path": Path(directory), "rank": r, "scale": scale, "dropout": float(dropout),
            "modules": modules, "weights": weights, "config": config, "full": full, "format": "peft"}
