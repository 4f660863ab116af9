"""`parrot train`: stage 1 (projector) / stage 2 (projector, MoE, LLM) training."""

from __future__ import annotations

import os
import sys

import click

from parrot.model.config import DTYPES
from parrot.registry import NAMES as BACKENDS
from parrot.training.config import TrainConfig


@click.command("train")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="cuda or cpu (torch), or mlx (Apple silicon; full, LoRA and QLoRA fine-tuning). Default: mlx on "
              "Apple silicon, cuda when a GPU is visible, else cpu.")
@click.option("--stage", type=click.Choice(["1", "2"]), required=True,
              help="1: train the projector (MoE bypassed). 2: projector, MoE and LLM.")
@click.option("--model", default=None, metavar="DIR", help="Parrot checkpoint to start from (e.g. stage 1's output).")
@click.option("--llm", default=None, metavar="DIR", help="Or: a plain Qwen2 LLM directory for a new model ...")
@click.option("--vision-tower", default=None, metavar="DIR|ID",
              help="... with this CLIP tower (with --model: overrides the checkpoint's tower).")
@click.option("--data", required=True, metavar="FILE.json", help="LLaVA JSON list of samples.")
@click.option("--image-dir", default=None, metavar="DIR", help="Folder the samples' images are relative to "
              "[default: the data file's folder].")
@click.option("--output", required=True, metavar="DIR", help="Run directory: checkpoints, metrics.jsonl, final model.")
@click.option("--lr", "--learning-rate", "lr", type=float, default=None,
              help="Peak learning rate [default: 1e-3 stage 1, 2e-5 stage 2].")
@click.option("--batch-size", type=int, default=None, help="Per-device micro-batch [default: 8 stage 1, 4 stage 2].")
@click.option("--grad-accum", type=int, default=None, help="Gradient accumulation steps [default: 4].")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--max-steps", "--iters", "max_steps", type=int, default=None,
              help="Optimizer steps; overrides --epochs (data is cycled).")
@click.option("--max-length", type=int, default=2048, show_default=True,
              help="Longest sample, counting the visual tokens.")
@click.option("--truncate", is_flag=True, help="Truncate samples longer than --max-length instead of dropping them.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Compute dtype [default: bfloat16 on cuda (float32 master weights), float32 on cpu].")
@click.option("--save-every", type=int, default=1000, show_default=True,
              help="Checkpoint every N steps (and at the end).")
@click.option("--save-total-limit", type=int, default=None, help="Keep only the N newest checkpoints.")
@click.option("--resume", is_flag=True, help="Continue the run in --output from its latest checkpoint.")
@click.option("--train-vision", is_flag=True, help="Unfreeze the vision tower.")
@click.option("--no-moe", is_flag=True, help="Stage 2 without the MoE (the paper's ablation).")
@click.option("--num-workers", type=int, default=4, show_default=True, help="Data loader worker processes.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", "--grad-checkpoint/--no-grad-checkpoint",
              default=True, show_default=True, help="Recompute decoder layers in the backward pass (less memory).")
@click.option("--packing/--no-packing", default=False, show_default=True,
              help="Padding-free batches: each micro-batch's samples packed into one row, attention kept within "
                   "each sample (flash-attention's varlen kernels on CUDA when installed); same loss, no padding.")
@click.option("--warmup-ratio", type=float, default=0.03, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True)
@click.option("--num-experts", type=int, default=6, show_default=True, help="New model (--llm) only: MoE experts.")
@click.option("--moe-intermediate-size", type=int, default=4096, show_default=True,
              help="New model (--llm) only: the experts' intermediate size.")
@click.option("--deepspeed", default=None, metavar="FILE.json|zero2|zero3",
              help="Shard with DeepSpeed ZeRO: a DeepSpeed config, \"auto\" fields filled from these flags; "
              "zero2 / zero3: the built-in configs of stage 1's / stage 2's recipe.")
@click.option("--fsdp", is_flag=True, help="Shard with FSDP2 (ZeRO-3 equivalent, checkpoints in DCP format).")
@click.option("--save-layout", type=click.Choice(["official", "mlx"]), default="official", show_default=True,
              help="Layout of the final model (mlx: with --backend mlx). Both load everywhere.")
@click.option("--lora", is_flag=True, help="Train LoRA adapters on the frozen LLM, plus the projector and MoE fully "
              "(torch: PEFT, saved in PEFT's format; mlx: mlx-lm's LoRA and format, QLoRA on a quantized base).")
@click.option("--lora-rank", type=int, default=None, help="LoRA rank [default: 8].")
@click.option("--lora-scale", type=float, default=None, help="LoRA scale, mlx-lm's convention [default: 20.0].")
@click.option("--lora-alpha", type=float, default=None, help="Or PEFT's alpha: scale = alpha / rank.")
@click.option("--lora-dropout", type=float, default=None, help="Dropout on the LoRA input [default: 0.0].")
@click.option("--lora-targets", default=None, metavar="NAMES",
              help="Comma-separated: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (attention, mlp), "
                   "experts (the MoE's), projector [default: attention,mlp of the LLM].")
@click.option("--lora-layers", "--num-layers", "lora_layers", type=int, default=None,
              help="Adapt the last N LLM layers [default: all].")
@click.option("--lora-only", "--train-adapters-only", "lora_only", is_flag=True,
              help="With --lora: train the adapters only (projector and MoE frozen).")
@click.option("--quantize", type=click.Choice(["4"]), default=None,
              help="QLoRA (--backend cuda, with --lora): the frozen base in 4-bit NF4 (bitsandbytes).")
@click.option("--mm-projector-lr", type=float, default=None, help="The projector's learning rate [default: --lr].")
@click.option("--moe-lr", type=float, default=None, help="The MoE's learning rate [default: --lr].")
@click.option("--group-by-modality-length", is_flag=True,
              help="LLaVA's sampler: each batch holds image samples only or text-only samples only, of similar "
              "length.")
@click.option("--report-to", type=click.Choice(["none", "tensorboard", "wandb"]), default="none", show_default=True,
              help="Also log to TensorBoard (OUTPUT/runs) or Weights & Biases (WANDB_MODE=offline works); "
              "metrics.jsonl is always written.")
@click.option("--eval-data", multiple=True, metavar="FILE.tsv",
              help="VLMEvalKit MCQ TSV(s) scored with `parrot eval`'s scorer during training (repeatable).")
@click.option("--eval-every", type=int, default=None, help="Evaluate every N steps (and at the end).")
@click.option("--eval-limit", type=int, default=None, help="Evaluate the first K questions of each TSV.")
@click.option("--save-best", is_flag=True, help="Keep the checkpoint with the best mean eval accuracy.")
def train(stage: str, lora_targets: str | None, quantize: str | None, eval_data: tuple[str, ...], **flags) -> None:
    """Train Parrot: stage 1 aligns the projector, stage 2 tunes projector, MoE and LLM.

    \b
    Examples:
      parrot train --stage 1 --llm Qwen1.5-7B-Chat --vision-tower openai/clip-vit-large-patch14-336 \\
                   --data pretrain.json --image-dir images/ --output runs/s1
      parrot train --stage 2 --model runs/s1 --data sft.json --image-dir images/ --output runs/s2
      parrot train --stage 2 --model runs/s1 ... --output runs/s2 --resume     # after an interruption
      torchrun --nproc_per_node 8 -m parrot.cli.main train --stage 2 --deepspeed zero3 ...
      deepspeed --num_gpus 8 --module parrot.cli.main train --stage 1 --deepspeed zero2 ...
      parrot train --backend mlx --stage 2 --model parrot-4bit --lora --data mine.json --output adapters/
      parrot train --backend cuda --stage 2 --model runs/s1 --lora --quantize 4 --data sft.json --output qlora/
    """
    from parrot.training import train as run_training
    from parrot.training.adapter import parse_targets

    targets = parse_targets(lora_targets) if lora_targets is not None else None
    run_training(TrainConfig(stage=int(stage), lora_targets=targets, quantize=int(quantize) if quantize else None,
                             eval_data=list(eval_data) or None, **flags))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # the run is complete and its process group destroyed; skip interpreter teardown, where gloo's and
        # DeepSpeed's C++ threads can still abort the process (pytorch/pytorch#179291) after a good run
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
