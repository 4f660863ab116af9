"""A DeepSpeed JSON config (`parrot train --deepspeed FILE`, or the built-in `zero2` / `zero3`), its
`"auto"` fields resolved from the run's flags the way transformers' `HfTrainerDeepSpeedConfig` resolves
them from TrainingArguments:

| key | value |
|---|---|
| train_micro_batch_size_per_gpu | --batch-size |
| gradient_accumulation_steps | --grad-accum |
| train_batch_size | world size x batch size x accumulation |
| gradient_clipping | --max-grad-norm |
| optimizer.params.lr / betas / eps / weight_decay | --lr / (0.9, 0.999) / 1e-8 / --weight-decay |
| scheduler.params.warmup_min_lr / warmup_max_lr | 0 / --lr |
| scheduler.params.total_num_steps / warmup_num_steps | the run's steps / max(1, warmup steps) |
| fp16.enabled / bf16.enabled | --dtype float16 / bfloat16 |
| zero_optimization.reduce_bucket_size | hidden x hidden |
| zero_optimization.stage3_prefetch_bucket_size (ZeRO-3) | int(0.9 x hidden x hidden) |
| zero_optimization.stage3_param_persistence_threshold (ZeRO-3) | 10 x hidden |

A value that is not "auto" must agree with the flags (as transformers checks). Parrot always steps a
torch AdamW with its own warmup + cosine schedule: an `optimizer` section (Adam / AdamW) only sets
betas and eps, a `scheduler` section is checked and then left out (DeepSpeed would otherwise build its
own). No torch and no deepspeed here: the file is checked before any process group starts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ParrotError

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass
class ResolvedDeepSpeed:
    config: dict[str, Any]  # what deepspeed.initialize gets (no optimizer / scheduler sections)
    stage: int
    file: dict[str, Any] = field(default_factory=dict)  # the whole file, "auto" resolved (written to the run)
    betas: tuple[float, float] = ADAM_BETAS
    eps: float = ADAM_EPS
    notes: list[str] = field(default_factory=list)


# configs shipped in the package (`configs/` in the repository): `--deepspeed zero2` or `--deepspeed zero3`
BUILTIN_CONFIGS = {"zero2": "stage 1's recipe", "zero3": "stage 2's recipe"}


def ds_config_text(path: str | Path) -> str:
    """The JSON text of a config file, or of a built-in config by name (an existing file of that name wins)."""
    p = Path(path)
    if p.is_file():
        return p.read_text(encoding="utf-8")
    if str(path) in BUILTIN_CONFIGS:
        return (resources.files("parrot.configs") / f"{path}.json").read_text(encoding="utf-8")
    names = ", ".join(f"{n} ({what})" for n, what in BUILTIN_CONFIGS.items())
    raise ParrotError(f"--deepspeed {p}: file not found; pass a DeepSpeed JSON config file or a built-in name: "
                      f"{names}")


def read_ds_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        d = json.loads(ds_config_text(path))
    except (ValueError, UnicodeDecodeError) as e:
        raise ParrotError(f"--deepspeed {p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ParrotError(f"--deepspeed {p}: expected a JSON object (a DeepSpeed config), got {type(d).__name__}")
    stage = d.get("zero_optimization", {}).get("stage", 0) if isinstance(d.get("zero_optimization"), dict) else None
    if stage not in (0, 1, 2, 3):
        raise ParrotError(f"--deepspeed {p}: zero_optimization.stage must be 0, 1, 2 or 3, not {stage!r}")
    return d


class _Filler:
    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.mismatches: list[str] = []

    def node(self, key: str) -> tuple[dict | None, str]:
        *parents, leaf = key.split(".")
        node = self.config
        for k in parents:
            node = node.get(k)
            if not isinstance(node, dict):
                return None, leaf
        return node, leaf

    def is_auto(self, key: str) -> bool:
        node, leaf = self.node(key)
        return node is not None and node.get(leaf) == "auto"

    def fill(self, key: str, value: Any, flag: str | None = None, must_match: bool = True) -> None:
        """"auto" -> value; otherwise, with `must_match`, a differing value is a mismatch."""
        node, leaf = self.node(key)
        if node is None:
            return
        if node.get(leaf) == "auto":
            node[leaf] = value
        elif must_match and leaf in node and not _same(node[leaf], value):
            self.mismatches.append(f"{key}={node[leaf]!r} but {flag} gives {value!r}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def resolve_ds_config(
    raw: dict[str, Any], *, batch_size: int, grad_accum: int, world_size: int, lr: float, weight_decay: float,
    max_grad_norm: float | None, dtype: str, hidden_size: int, total_steps: int, warmup_steps: int,
    source: str = "--deepspeed",
) -> ResolvedDeepSpeed:
    """The config with every "auto" filled in from the run's settings; a ParrotError lists any mismatch."""
    cfg = json.loads(json.dumps(raw))  # a deep copy
    f = _Filler(cfg)
    # transformers' trainer_config_process
    f.fill("train_micro_batch_size_per_gpu", batch_size, "--batch-size")
    f.fill("gradient_accumulation_steps", grad_accum, "--grad-accum")
    f.fill("train_batch_size", world_size * batch_size * grad_accum, "world size x --batch-size x --grad-accum")
    f.fill("gradient_clipping", 0.0 if max_grad_norm is None else max_grad_norm, "--max-grad-norm")
    f.fill("optimizer.params.lr", lr, "--lr")
    f.fill("optimizer.params.betas", list(ADAM_BETAS), "Adam betas (0.9, 0.999)")
    f.fill("optimizer.params.eps", ADAM_EPS, "Adam eps 1e-8")
    f.fill("optimizer.params.weight_decay", weight_decay, "--weight-decay")
    f.fill("scheduler.params.warmup_min_lr", 0, must_match=False)
    f.fill("scheduler.params.warmup_max_lr", lr, "--lr")
    f.fill("fp16.enabled", dtype == "float16", "--dtype")
    f.fill("bf16.enabled", dtype == "bfloat16", "--dtype")
    # transformers' trainer_config_finalize
    zero = cfg.get("zero_optimization") if isinstance(cfg.get("zero_optimization"), dict) else {}
    stage = int(zero.get("stage", 0))
    f.fill("zero_optimization.reduce_bucket_size", hidden_size * hidden_size, must_match=False)
    if stage == 3:
        f.fill("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size), must_match=False)
        f.fill("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size, must_match=False)
    f.fill("scheduler.params.total_num_steps", total_steps, "the run's step count")
    f.fill("scheduler.params.warmup_num_steps", max(1, warmup_steps), "--warmup-ratio")
    if f.mismatches:
        raise ParrotError(f"{source}: these values disagree with the run's settings: " + "; ".join(f.mismatches)
                          + '. Set them to "auto" (or change the flags).')
    # what transformers leaves to DeepSpeed's own defaults, made explicit so the batch always adds up
    cfg.setdefault("train_micro_batch_size_per_gpu", batch_size)
    cfg.setdefault("gradient_accumulation_steps", grad_accum)
    cfg.setdefault("train_batch_size", world_size * batch_size * grad_accum)
    cfg.setdefault("gradient_clipping", 0.0 if max_grad_norm is None else max_grad_norm)
    got = (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"])
    if got[2] != got[0] * got[1] * world_size:
        raise ParrotError(f"{source}: train_batch_size {got[2]} != micro batch {got[0]} x accumulation {got[1]} "
                          f"x {world_size} processes")
    for key, needs in (("fp16", "float16"), ("bf16", "bfloat16")):
        sec = cfg.get(key)
        if isinstance(sec, dict) and sec.get("enabled") is True and dtype != needs:
            raise ParrotError(f"{source}: {key}.enabled is true but --dtype is {dtype}; set it to \"auto\"")
    out = ResolvedDeepSpeed(cfg, stage, json.loads(json.dumps(cfg)))
    opt = cfg.pop("optimizer", None)
    if opt is not None:
        kind = str(opt.get("type", "")).lower() if isinstance(opt, dict) else ""
        if kind not in ("adam", "adamw"):
            raise ParrotError(f"{source}: optimizer type {opt.get('type') if isinstance(opt, dict) else opt!r} is not "
                              "supported; Parrot trains with AdamW (remove the optimizer section, or use AdamW)")
        params = opt.get("params", {})
        out.betas = tuple(params.get("betas", ADAM_BETAS))
        out.eps = float(params.get("eps", ADAM_EPS))
        out.notes.append(f"optimizer section: torch AdamW with betas {out.betas}, eps {out.eps:g}")
    if cfg.pop("scheduler", None) is not None:
        out.notes.append("scheduler section checked and left out: Parrot's warmup + cosine schedule runs instead")
    return out
