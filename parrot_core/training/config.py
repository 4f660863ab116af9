"""The training run's configuration, shared by every backend's trainer (`parrot train`).

`TrainConfig` holds the flags as given; `resolved()` fills the official per-stage defaults
(stage 1: lr 1e-3, per-device batch 8 x 4 accumulation; stage 2: lr 2e-5, batch 4 x 4; both: 1 epoch,
cosine with 3% warmup, max length 2048, grad clip 1.0, weight decay 0, gradient checkpointing; bf16
on CUDA, fp32 elsewhere). The resolved config is written next to the checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .. import registry
from ..errors import ParrotError
from ..model.config import DTYPES
from ..model.schema import TRAIN_CONFIG, check
from .adapter import LORA_FIELDS, resolve_lora

STAGE_DEFAULTS: dict[int, dict[str, Any]] = {
    1: {"lr": 1e-3, "batch_size": 8, "grad_accum": 4},  # scripts/train/pretrain.sh (x 8 GPUs: global 256)
    2: {"lr": 2e-5, "batch_size": 4, "grad_accum": 4},  # scripts/train/finetune.sh (x 8 GPUs: global 128)
}
# fields that shape the trajectory: a resumed run must use the same values as the checkpoint's run
# (--grad-accum may change with the number of processes, as long as the global batch stays the same)
TRAJECTORY_FIELDS = (
    "stage", "model", "llm", "vision_tower", "data", "image_dir", "lr", "batch_size", "epochs",
    "max_steps", "max_length", "seed", "dtype", "train_vision", "no_moe", "warmup_ratio", "weight_decay",
    "max_grad_norm", "truncate", "num_experts", "moe_intermediate_size", "moe_weight",
    "lora", "lora_rank", "lora_scale", "lora_dropout", "lora_targets", "lora_layers", "lora_only", "quantize",
    "mm_projector_lr", "moe_lr", "group_by_modality_length",
)
REPORT_TO = ("none", "tensorboard", "wandb")


@dataclass
class TrainConfig:
    stage: int
    data: str
    output: str
    model: str | None = None  # a Parrot checkpoint (official or MLX layout)
    llm: str | None = None  # or a plain Qwen2 LLM directory, plus a CLIP vision tower
    vision_tower: str | None = None
    image_dir: str | None = None  # default: the data file's directory
    backend: str | None = None  # None: the machine's default (parrot.registry.default_backend)
    lr: float | None = None
    batch_size: int | None = None  # per device
    grad_accum: int | None = None
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs; the data is cycled as needed
    max_length: int = 2048
    seed: int = 42
    dtype: str | None = None  # compute dtype; None: bfloat16 on cuda, float32 elsewhere
    save_every: int = 1000
    save_total_limit: int | None = None
    resume: bool = False
    train_vision: bool = False
    no_moe: bool = False
    num_workers: int = 4
    gradient_checkpointing: bool = True
    packing: bool = False  # each micro-batch's samples as one row without padding, attention within each sample
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    truncate: bool = False  # truncate samples longer than max_length instead of dropping them
    # only for a new model (--llm): the MoE's size (official: 6 experts, intermediate 4096, weight 0.1)
    num_experts: int = 6
    moe_intermediate_size: int = 4096
    moe_weight: float = 0.1
    # sharding: a DeepSpeed JSON config (ZeRO-2/3) or FSDP2; neither = one process, no sharding
    deepspeed: str | None = None
    fsdp: bool = False
    # LoRA / QLoRA: adapters on the LLM, plus the projector and MoE trained fully (unless lora_only)
    lora: bool = False
    lora_rank: int | None = None  # default 8
    lora_scale: float | None = None  # mlx-lm's scale (default 20.0) ...
    lora_alpha: float | None = None  # ... or PEFT's alpha: scale = alpha / rank
    lora_dropout: float | None = None  # default 0.0
    lora_targets: list[str] | None = None  # default: the LLM's attention and MLP projections
    lora_layers: int | None = None  # adapt the last N LLM layers (mlx-lm's --num-layers); default all
    lora_only: bool = False  # train the adapters only (projector and MoE frozen)
    quantize: int | None = None  # QLoRA: the frozen base in 4 bits (NF4, bitsandbytes; --backend cuda)
    # the official recipe's knobs: separate learning rates, LLaVA's modality-grouped sampler
    mm_projector_lr: float | None = None  # None: --lr
    moe_lr: float | None = None  # None: --lr
    group_by_modality_length: bool = False
    # logging and evaluation during training
    report_to: str = "none"  # or tensorboard, wandb (metrics.jsonl is always written)
    eval_data: list[str] | None = None  # VLMEvalKit MCQ TSVs scored every eval_every steps
    eval_every: int | None = None
    eval_limit: int | None = None  # the first K questions of each TSV
    save_best: bool = False  # keep the checkpoint with the best mean eval accuracy
    save_layout: str = "official"  # the final model's layout; "mlx" with --backend mlx

    def resolved(self) -> TrainConfig:
        """A copy with the per-stage and per-backend defaults filled in, validated."""
        if self.stage not in STAGE_DEFAULTS:
            raise ParrotError(f"--stage must be 1 or 2, not {self.stage}")
        d = STAGE_DEFAULTS[self.stage]
        backend = self.backend or registry.default_backend()
        out = replace(
            self,
            backend=backend,
            lr=d["lr"] if self.lr is None else self.lr,
            batch_size=d["batch_size"] if self.batch_size is None else self.batch_size,
            grad_accum=d["grad_accum"] if self.grad_accum is None else self.grad_accum,
            dtype=self.dtype or registry.get(backend).train_dtype,
        )
        if out.lora:
            out = replace(out, **resolve_lora(out.lora_rank, out.lora_scale, out.lora_alpha, out.lora_dropout,
                                              out.lora_targets))
        for name in ("data", "output", "model", "llm", "vision_tower", "image_dir", "deepspeed"):
            v = getattr(out, name)
            if v is not None and Path(v).exists():  # absolute, so a resume from elsewhere compares equal
                setattr(out, name, str(Path(v).resolve()))
        if out.image_dir is None:
            out.image_dir = str(Path(out.data).resolve().parent)
        out.validate()
        return out

    def validate(self) -> None:
        spec = registry.get(self.backend)
        if (self.model is None) == (self.llm is None):
            raise ParrotError(
                "give either --model DIR (a Parrot checkpoint, e.g. stage 1's output) or --llm DIR with "
                "--vision-tower DIR|ID (a new model from a plain Qwen2 LLM and a CLIP tower)"
            )
        if self.llm is not None and self.vision_tower is None:
            raise ParrotError(
                "--llm needs --vision-tower DIR|ID (the CLIP tower, e.g. openai/clip-vit-large-patch14-336)"
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ParrotError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "epochs": self.epochs,
                    "max_length": self.max_length, "save_every": self.save_every, "num_experts": self.num_experts,
                    "moe_intermediate_size": self.moe_intermediate_size}
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        if self.save_total_limit is not None:
            positive["save_total_limit"] = self.save_total_limit
        for name, v in positive.items():
            if v is not None and v < 1:
                raise ParrotError(f"--{name.replace('_', '-')} must be at least 1, not {v}")
        if self.lr is not None and self.lr < 0:
            raise ParrotError(f"--lr must not be negative, not {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ParrotError(f"--warmup-ratio must be in [0, 1), not {self.warmup_ratio}")
        if self.num_workers < 0:
            raise ParrotError(f"--num-workers must not be negative, not {self.num_workers}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ParrotError(f"--max-grad-norm must be positive, not {self.max_grad_norm}")
        if self.deepspeed is not None and self.fsdp:
            raise ParrotError("--deepspeed and --fsdp are two ways to shard the model: choose one")
        if not spec.sharding and (self.deepspeed is not None or self.fsdp):
            raise ParrotError(f"--deepspeed / --fsdp shard the torch backends; --backend {self.backend} trains in "
                              f"one process: use --backend {_with('sharding')}")

        self._validate_lora()
        self._validate_recipe()
        if self.save_layout not in ("official", "mlx"):
            raise ParrotError(f"--save-layout must be official or mlx, not {self.save_layout!r}")
        if self.save_layout != "official" and spec.native_layout != self.save_layout:
            raise ParrotError(f"--save-layout {self.save_layout} is for --backend {_with('native_layout', 'mlx')}; "
                              "convert a torch run's output with "
                              "`parrot convert OUTPUT DST --to mlx`")

    def _validate_lora(self) -> None:
        given = [f"--{n.replace('_', '-')}" for n in LORA_FIELDS if getattr(self, n) is not None]
        given += ["--lora-only"] if self.lora_only else []
        given += ["--quantize"] if self.quantize is not None else []
        if not self.lora:
            if given:
                raise ParrotError(f"{', '.join(given)}: LoRA settings apply only with --lora")
            return
        spec = registry.get(self.backend)
        if not spec.lora_training:
            raise ParrotError(f"--lora trains adapters on --backend {_with('lora_training')} only (--backend "
                              f"{self.backend} trains the stage's full parameter set)")
        if self.quantize is not None:
            if self.quantize != 4:
                raise ParrotError(f"--quantize {self.quantize}: QLoRA quantizes the base to 4 bits (--quantize 4)")
            if spec.qlora != "nf4":
                instead = ("trains LoRA on a quantized MLX base instead: `parrot convert M Q -q 4`, then --model Q"
                           if spec.qlora == "quantized_base" else "trains LoRA on a float base: drop --quantize")
                raise ParrotError(f"--quantize 4 (QLoRA, NF4 through bitsandbytes) needs --backend "
                                  f"{_with('qlora', 'nf4')} (a CUDA GPU); --backend {self.backend} {instead}")
        if self.strategy != "single":
            raise ParrotError("--lora trains in one process here; drop --deepspeed / --fsdp (the frozen base "
                              "is not sharded)")
        if self.stage != 2:
            raise ParrotError("--lora adapts the LLM in stage 2; stage 1 trains the projector only (drop --lora)")
        if self.train_vision:
            raise ParrotError("--train-vision trains the CLIP tower fully; it does not combine with --lora")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise ParrotError(f"--lora-layers must be at least 1, not {self.lora_layers}")
        if self.no_moe and self.lora_targets and "experts" in self.lora_targets:
            raise ParrotError("--lora-targets experts needs the MoE; it does not combine with --no-moe")

    def _validate_recipe(self) -> None:
        for name in ("mm_projector_lr", "moe_lr"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ParrotError(f"--{name.replace('_', '-')} must not be negative, not {v}")
        if self.moe_lr is not None and not self.use_moe:
            raise ParrotError("--moe-lr sets the MoE's learning rate; the MoE does not train here "
                              "(stage 1 or --no-moe)")
        if self.lora and self.lora_only and (self.mm_projector_lr is not None or self.moe_lr is not None):
            raise ParrotError("--mm-projector-lr / --moe-lr: with --lora-only the projector and MoE stay frozen")
        if self.report_to not in REPORT_TO:
            raise ParrotError(f"--report-to must be one of {', '.join(REPORT_TO)}, not {self.report_to!r}")
        if (self.eval_every is not None or self.eval_limit is not None or self.save_best) and not self.eval_data:
            raise ParrotError("--eval-every / --eval-limit / --save-best need --eval-data FILE.tsv")
        if self.eval_data and self.strategy != "single":
            raise ParrotError("--eval-data evaluates on rank 0 of a one-process run; drop --deepspeed / --fsdp, or "
                              "evaluate the checkpoints with `parrot eval` (sharded over processes)")
        if self.eval_data and self.eval_every is None:
            raise ParrotError("--eval-data needs --eval-every N (evaluate every N steps)")
        for name in ("eval_every", "eval_limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ParrotError(f"--{name.replace('_', '-')} must be at least 1, not {v}")
        if self.save_best and self.save_total_limit is not None and self.save_total_limit < 2:
            raise ParrotError("--save-best keeps the best checkpoint beside the newest: --save-total-limit must be "
                              "at least 2")

    @property
    def module_lrs(self) -> dict[str, float]:
        """Peak learning rates of modules that do not use --lr: {"mm_projector": ..., "moe_model": ...}
        (--mm-projector-lr, --moe-lr; LLaVA's mm_projector_lr), as optimizer parameter groups on both backends."""
        lrs = {"mm_projector": self.mm_projector_lr, "moe_model": self.moe_lr}
        return {k: v for k, v in lrs.items() if v is not None}

    @property
    def strategy(self) -> str:
        """How the model is sharded: "deepspeed", "fsdp" or "single" (one process, or plain replicas)."""
        return "deepspeed" if self.deepspeed is not None else "fsdp" if self.fsdp else "single"

    @property
    def use_moe(self) -> bool:
        """Stage 1 bypasses the MoE (official `use_moe False`); stage 2 trains it unless --no-moe."""
        return self.stage == 2 and not self.no_moe

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "run_config.json") -> TrainConfig:
        """The settings as run_config.json records them, checked against `schema.TRAIN_CONFIG`."""
        check(d, TRAIN_CONFIG, source)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def trajectory_diff(self, other: TrainConfig) -> list[str]:
        """The trajectory fields whose values differ (for --resume)."""
        return [f"{k} {getattr(other, k)!r} -> {getattr(self, k)!r}"
                for k in TRAJECTORY_FIELDS if getattr(self, k) != getattr(other, k)]


def _with(capability: str, value: object = True) -> str:
    """The backends whose `capability` is `value`, for messages (e.g. "cpu, cuda")."""
    return ", ".join(n for n, s in registry.BACKENDS.items() if getattr(s, capability) == value)
