"""`parrot generate`: answer a JSONL file of (image, prompt) requests into a JSONL file, resumably."""

from __future__ import annotations

import sys

import click

from . import common


@click.command("generate", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", default=common.DEFAULT_MODEL, show_default=True,
              help="Model directory (official or MLX layout) or a hub id.")
@common.backend_option()
@click.option("--input", "-i", "input_path", required=True, type=click.Path(dir_okay=False),
              help="Requests, one JSON object per line: id, prompt, optional image and settings.")
@click.option("--output", "-o", "output_path", required=True, type=click.Path(dir_okay=False),
              help="Answers (JSONL), appended row by row; rerun the command to resume.")
@click.option("--image-dir", default=None, type=click.Path(file_okay=False),
              help="Folder relative image paths start from [default: the input file's folder].")
@click.option("--batch-size", "-b", type=int, default=1, show_default=True,
              help="Requests decoded together (batched prefill and decode).")
@common.sampling_options(seed_help="Seed for sampling (each answer records the seed it used).")
@common.system_option()
@common.dtype_option()
@common.vision_tower_option()
@common.adapter_option()
@click.option("--quiet", is_flag=True, help="No progress bar.")
def generate(model_path, backend, input_path, output_path, image_dir, batch_size, max_tokens, temp, top_p, seed,
             system, dtype, vision_tower, adapter_path, quiet):
    """Answer every request of --input into --output (JSONL).

    \b
    Input rows:  {"id": "q1", "image": "cat.jpg", "prompt": "What is in the picture?"}
    Output rows: {"id": "q1", "text": "...", "finish_reason": "stop", ...} or {"id": ..., "error": "..."}
    Per-row max_tokens, temperature (or temp), top_p, seed, system override the options.
    Rerunning skips the ids already answered and retries the rows that failed.
    """
    import parrot
    from parrot.errors import ParrotError
    from parrot.inference.answers import answer_file, check_answer_output, load_answers, read_requests
    from parrot.registry import default_backend

    # the output is no input (nor inside the model, tower or adapter): checked before anything is read or written
    check_answer_output(output_path, input_path, [("--model", model_path), ("--vision-tower", vision_tower),
                                                  ("--adapter", adapter_path)], image_dir)
    defaults = common.sampling_settings(max_tokens, temp, top_p, seed)  # bad values fail before the model loads
    if batch_size < 1:
        raise ParrotError(f"--batch-size must be >= 1 (got {batch_size})")
    rows, _ = read_requests(input_path)  # so does an unreadable input
    if not rows:
        raise ParrotError(f"{input_path}: no requests (expected one JSON object per line: id, prompt, image)")
    done = len({r.key for r in rows if r.key is not None} & load_answers(output_path))
    if done == len(rows):
        click.echo(f"All {len(rows)} requests of {input_path} are answered in {output_path}.", err=True)
        return
    backend = backend or default_backend()
    click.echo(f"Loading {model_path} ({backend})...", err=True)
    model = parrot.load(model_path, backend=backend, dtype=dtype, vision_tower=vision_tower, adapter=adapter_path)
    click.echo(f"{len(rows)} requests, {done} already answered, {len(rows) - done} to do.", err=True)
    try:
        s = answer_file(model, input_path, output_path, image_dir, batch_size, {**defaults, "system": system},
                        progress=not quiet)
    except KeyboardInterrupt:
        click.echo(f"Interrupted. The answers written so far are kept in {output_path}; "
                   "run the same command again to continue.", err=True)
        sys.exit(130)
    if s.ignored_fields:
        click.echo(f"Note: ignored input fields: {', '.join(s.ignored_fields)}.", err=True)
    rate = s.generation_tokens / max(s.seconds, 1e-9)
    click.echo(f"Answered {s.answered}, errors {s.errors}, skipped {s.skipped} (already answered) in "
               f"{s.seconds:.1f} s ({rate:.1f} tokens/s) -> {s.output}", err=True)
    if s.errors:
        click.echo(f"{s.errors} rows have an \"error\" field; fix them and rerun to retry only those.", err=True)
