"""`parrot inspect`: look inside a model (`routing`: the MoE's mean routing weights per language)."""

from __future__ import annotations

from pathlib import Path

import click

from . import common


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def inspect() -> None:
    """Look inside a Parrot model."""


@inspect.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", required=True, help="Model directory (official or MLX layout), a hub id, "
              "or `demo`.")
@click.option("--data", "files", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="VLMEvalKit MCQ TSV (language from its name: _cn, _pt, _ar, _ru, _tr, else en) or LLaVA JSON "
              "(a sample's \"lang\" field, else guessed from the script). Repeatable.")
@click.option("--image-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder a LLaVA JSON's images are relative to [default: the JSON file's folder].")
@click.option("--output", "-o", type=click.Path(file_okay=False), default=None,
              help="Write routing.json and routing.png (the heatmap; needs matplotlib) here.")
@common.backend_option()
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N questions of each file.")
@common.vision_tower_option()
def routing(model_path, files, image_dir, output, backend, limit, vision_tower):
    """Mean MoE routing weights over the experts, per language (and per category), for the questions in
    --data, as official inference computes them (the prompt's text guides the experts).

    \b
    Examples:
      parrot inspect routing --model demo --data demo_en.tsv --data demo_cn.tsv --output routing/
      parrot inspect routing --model AIDC-AI/Parrot-7B --data MMMB_en.tsv --data MMMB_ar.tsv --limit 200
    """
    from tqdm import tqdm

    import parrot
    from parrot.inference.routing import inspect_routing, write_report
    from parrot.registry import default_backend

    backend = backend or default_backend()
    model = parrot.load(model_path, backend=backend, vision_tower=vision_tower)
    report = inspect_routing(model, [Path(f) for f in files], limit,
                             progress=lambda xs: tqdm(xs, desc="routing", unit="q", leave=False),
                             image_dir=Path(image_dir) if image_dir else None)
    n = report["num_experts"]
    click.echo("lang  questions  " + "  ".join(f"  E{i}" for i in range(n)))
    for lang, r in report["languages"].items():
        click.echo(f"{lang:<5} {r['questions']:>9}  " + "  ".join(f"{v:.2f}".rjust(4) for v in r["mean"]))
    if output is not None:
        for p in write_report(report, Path(output)):
            click.echo(f"wrote {p}")
