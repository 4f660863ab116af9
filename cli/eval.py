"""`parrot eval`: MMMB and multilingual MMBench (or any VLMEvalKit MCQ TSV), scored as VLMEvalKit does."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from parrot import registry
from parrot.errors import ParrotError

from .common import adapter_option, backend_option, dtype_option, vision_tower_option


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("data", nargs=-1, required=True)
@click.option("--model", "model_path", default=None,
              help="Model directory (official or MLX layout) or a hub id; or --predictions.")
@backend_option()
@click.option("--output", "--output-dir", "-o", "output", required=True, type=click.Path(path_type=Path),
              help="Output directory: <dataset>.tsv (answers), <dataset>_acc.csv, summary.json, summary.png.")
@click.option("--batch-size", "-b", type=int, default=1, show_default=True, help="Questions decoded together.")
@click.option("--limit", type=int, default=None, help="Only the first N questions of each dataset (a smoke test).")
@click.option("--max-tokens", "-m", type=int, default=512, show_default=True, help="Most new tokens per answer.")
@click.option("--predictions", multiple=True, type=click.Path(path_type=Path),
              help="Score these predictions (TSV, CSV, XLSX, JSONL, or a folder of them) instead of running a "
                   "model; VLMEvalKit's <model>_<dataset>.xlsx files are recognised by name. Repeatable.")
@click.option("--judge-url", default=None, help="OpenAI-compatible endpoint (e.g. http://localhost:8000/v1) "
                                                "asked about predictions the rules cannot match.")
@click.option("--judge-model", default=None, help="The judge's model name (with --judge-url).")
@click.option("--judge-seed", type=int, default=0, show_default=True,
              help="Seed of the random pick after 3 unusable judge replies.")
@dtype_option()
@vision_tower_option()
@adapter_option()
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_command(data, model_path, backend, output, batch_size, limit, max_tokens, predictions, judge_url,
                 judge_model, judge_seed, dtype, vision_tower, adapter_path, quiet):
    """Evaluate on DATA: VLMEvalKit MCQ TSV files or dataset names (MMMB_en ... MMMB_ru, MMMB for all six,
    MMBench_dev_en ... MMBench_dev_ru, MTL_MMBench_DEV for all six), scored as VLMEvalKit scores them.

    \b
    Examples:
      parrot eval MMMB --model AIDC-AI/Parrot-7B --backend cuda --output eval/parrot-7b --batch-size 16
      torchrun --nproc_per_node 8 -m parrot.cli.main eval MMMB MTL_MMBench_DEV --model Parrot-7B -o eval/p7b
      parrot eval MMMB_en --model parrot-7b-4bit --backend mlx --output eval/4bit
      parrot eval MMMB --predictions outputs/Parrot/ --output eval/rescored
    Rerun the same command after an interruption: answered questions are not asked again.
    """
    if (model_path is None) == (not predictions):
        raise ParrotError("give --model to answer the questions, or --predictions FILE to score existing answers")
    for name, value, low in (("--batch-size", batch_size, 1), ("--max-tokens", max_tokens, 1), ("--limit", limit, 1)):
        if value is not None and value < low:
            raise ParrotError(f"{name} must be >= {low} (got {value})")
    if (judge_url is None) != (judge_model is None):
        raise ParrotError("--judge-url and --judge-model go together")
    try:
        import pandas  # noqa: F401
    except ImportError:
        raise ParrotError("parrot eval needs pandas (and openpyxl for .xlsx): pip install 'parrot-vlm[eval]'") from None
    from parrot.eval import EvalSettings, LLMJudge, evaluate, resolve_sources
    from parrot.training import launch_world

    rank, world = launch_world()
    backend = backend or (registry.default_backend() if model_path else "cpu")  # --predictions: no model
    spec = registry.get(backend)
    if world > 1 and (spec.process_group is None or predictions):
        parallel = ", ".join(n for n, s in registry.BACKENDS.items() if s.process_group)
        raise ParrotError(f"several processes answer shards of the data with --backend {parallel}; "
                          f"--backend {backend} and --predictions run in one process")
    group = spec.load("process_group")(spec.device) if world > 1 else None
    echo = (lambda m: click.echo(m, err=True)) if rank == 0 else (lambda m: click.echo(f"[rank {rank}] {m}", err=True))
    sources = resolve_sources(list(data), progress=not quiet) if rank == 0 else None
    if group is not None:
        sources = group.share(sources)
    judge = LLMJudge(judge_url, judge_model, seed=judge_seed) if judge_url else None
    if judge is not None and rank == 0:
        judge.check()

    def load_model():
        import parrot

        echo(f"Loading {model_path} ({backend})...")
        return parrot.load(model_path, backend=backend, dtype=dtype, vision_tower=vision_tower, adapter=adapter_path)
    meta = {"model": model_path, "backend": backend if model_path else None, "max_tokens": max_tokens,
            "limit": limit, "judge": judge_model}
    settings = EvalSettings(batch_size=batch_size, limit=limit, max_tokens=max_tokens, progress=not quiet)
    try:
        summary = evaluate(sources, output, predictions=list(predictions) or None, judge=judge, settings=settings,
                           rank=rank, world=world, barrier=group.barrier if group else None, echo=echo, meta=meta,
                           load_model=load_model if model_path else None, model_dir=model_path)
    except KeyboardInterrupt:
        click.echo(f"Interrupted. The answers so far are kept in {output}; run the same command again to continue.",
                   err=True)
        sys.exit(130)
    if rank == 0:
        from parrot.eval.evaluate import problems_report
        from parrot.eval.report import results_table

        click.echo(results_table({s.name: summary["datasets"][s.name]["overall"] for s in sources}))
        for line in problems_report(summary, [s.name for s in sources]):
            click.echo(line, err=True)
        click.echo(f"Scores in {output}: summary.json, <dataset>_acc.csv; answers in <dataset>.tsv.", err=True)
    if group is not None:
        group.close()
        # gloo's threads can abort the interpreter's teardown after a good run (as in `parrot train`)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
