"""`parrot convert SRC DST`: official <-> MLX layouts, optionally quantized (parrot.convert)."""

from __future__ import annotations

import sys
import warnings

import click

from parrot.errors import ParrotError
from parrot.model.config import DTYPES


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


@click.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--to", "to", type=click.Choice(["mlx", "hf"]), default="mlx", show_default=True,
              help="Output layout: mlx, or hf (the official / Hugging Face layout, float).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Float dtype of the output. Default: the source's stored dtype (never downcast silently).")
@click.option("-q", "--quantize", "bits", type=click.Choice(["4", "8"]), default=None,
              help="Quantize the LLM's linear layers and embeddings to 4 or 8 bits (MLX affine).")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="Quantization group size [default: 64].")
@click.option("--quantize-experts/--no-quantize-experts", default=None,
              help="Quantize the MoE experts too [default: yes; see docs/benchmarks.md].")
@click.option("--quantize-embeddings/--no-quantize-embeddings", default=None,
              help="Quantize embed_tokens and lm_head too [default: yes, as mlx-lm does].")
@click.option("--vision-tower", default=None, metavar="DIR|ID",
              help="CLIP tower: merged when SRC lacks its weights; its config when mm_vision_tower doesn't resolve.")
@click.option("--config", "config", default=None, metavar="DIR",
              help="For a training checkpoint SRC: a directory with its config.json, tokenizer and preprocessor "
              "settings [default: SRC/model, written by parrot train].")
@click.option("--fuse-adapter", "--adapter-path", "adapter", default=None, metavar="DIR",
              help="Fuse this LoRA adapter (parrot train --lora's output, trained on SRC) into the weights "
              "(--adapter-path: mlx_lm.fuse's name).")
@click.option("--adapter-format", type=click.Choice(["peft", "mlx-lm"]), default=None,
              help="SRC is a LoRA adapter (either format): write it to DST in PEFT's or mlx-lm's format.")
@click.option("--force", is_flag=True,
              help="Replace DST if it is a previous `parrot convert` output (anything else is never replaced).")
def convert(src: str, dst: str, to: str, dtype: str | None, bits: str | None, group_size: str | None,
            quantize_experts: bool | None, quantize_embeddings: bool | None, vision_tower: str | None,
            config: str | None, adapter: str | None, adapter_format: str | None, force: bool) -> None:
    """Convert the Parrot model SRC (official or MLX directory, or a hub id) into DST.

    SRC may also be a training checkpoint (`parrot train`: OUTPUT/checkpoints/step-N), consolidated into a full
    model: sharded ones (--deepspeed, --fsdp) hold every weight; one-process ones hold the trained tensors and
    take the others from the run's source model. DST is never an input, nor inside or around one; --force
    replaces only a previous `parrot convert` output.

    \b
    Examples:
      parrot convert AIDC-AI/Parrot-7B parrot-7b-mlx --to mlx
      parrot convert AIDC-AI/Parrot-7B parrot-7b-4bit -q 4
      parrot convert parrot-7b-mlx parrot-7b-hf --to hf
      parrot convert runs/s2/checkpoints/step-00001000 s2-step1000 --to hf
      parrot convert parrot-7b-4bit parrot-7b-tuned --fuse-adapter runs/lora    # base + adapter, float
      parrot convert runs/lora lora-peft --adapter-format peft                  # mlx-lm's adapter -> PEFT's
    """
    if adapter_format is not None:
        from parrot.convert.adapters import convert_adapter

        if (to, dtype, bits, adapter, vision_tower, config) != ("mlx", None, None, None, None, None):
            raise ParrotError("--adapter-format converts an adapter directory; it takes no other option but --force")
        read = convert_adapter(src, dst, adapter_format, force=force)
        click.echo(f"wrote the {read} adapter {src} as a {adapter_format} adapter to {dst}")
        return
    from tqdm import tqdm

    from parrot.convert import convert_checkpoint
    from parrot.convert.quantize import QUANTIZE_EXPERTS_DEFAULT

    if bits is None and (group_size, quantize_experts, quantize_embeddings) != (None, None, None):
        raise ParrotError("--group-size, --quantize-experts and --quantize-embeddings apply to quantization; "
                          "add -q 4 or -q 8")
    bar: list[tqdm] = []

    def start(source) -> None:
        bar.append(tqdm(total=source.total_bytes(), unit="B", unit_scale=True, unit_divisor=1024,
                        desc="converting", dynamic_ncols=True))

    def show(message, *args, **kwargs) -> None:
        tqdm.write(f"Warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            result = convert_checkpoint(
                src, dst, to=to, dtype=dtype, quantize_bits=int(bits) if bits else None,
                group_size=int(group_size or 64),
                quantize_experts=QUANTIZE_EXPERTS_DEFAULT if quantize_experts is None else quantize_experts,
                quantize_embeddings=quantize_embeddings is not False,
                vision_tower=vision_tower, force=force, on_start=start, config=config, adapter=adapter,
                progress=lambda n: bar[0].update(n),
            )
        finally:
            for b in bar:
                b.close()
    what = "MLX" if result.target == "mlx" else "official (hf)"
    if adapter is not None:
        what += f", adapter {adapter} fused"
    q = result.quantization
    if q:
        what += f", {q['bits']}-bit (group size {q['group_size']}: {len(q['quantized'])} module kinds quantized"
        what += f", {len(q['kept_float'])} kept float)" if q["kept_float"] else ")"
    rate = result.source_bytes / max(result.seconds, 1e-9)
    click.echo(f"Wrote {result.path} ({what}, {result.dtype}): {_size(result.written_bytes)} from "
               f"{_size(result.source_bytes)} in {result.seconds:.1f} s ({_size(rate)}/s)")
