"""`parrot bench`: prompt / generation tokens per second, time to first token, peak memory (mlx-lm's format)."""

from __future__ import annotations

import click

from .common import adapter_option, backend_option, dtype_option, vision_tower_option


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", required=True, help="Model directory (official or MLX layout) or a hub id.")
@backend_option()
@click.option("--prompt-tokens", "-p", type=int, default=512, show_default=True,
              help="Random text tokens in the prompt (the visual tokens come on top).")
@click.option("--gen-tokens", "--generation-tokens", "-g", type=int, default=128, show_default=True,
              help="Tokens generated per trial (the stop token is ignored).")
@click.option("--image", default=None, type=click.Path(dir_okay=False),
              help="Image to ask about [default: a synthetic image at the model's crop size].")
@click.option("--no-image", is_flag=True, help="Text only (no vision work).")
@click.option("--num-trials", "-n", type=int, default=3, show_default=True, help="Timed trials (after one warmup).")
@click.option("--batch-size", "-b", type=int, default=1, show_default=True, help="Prompts decoded together.")
@dtype_option()
@vision_tower_option()
@adapter_option()
def bench(model_path, backend, prompt_tokens, gen_tokens, image, no_image, num_trials, batch_size, dtype,
          vision_tower, adapter_path):
    """Measure prompt and generation speed, time to first token (vision + prefill) and peak memory."""
    import parrot
    from parrot.errors import ParrotError
    from parrot.inference.bench import format_averages, format_trial, run_benchmark
    from parrot.model.image import ImageSettings, open_image
    from parrot.registry import default_backend

    if image is not None and no_image:
        raise ParrotError("--image and --no-image exclude each other")
    for name, v in (("--prompt-tokens", prompt_tokens), ("--gen-tokens", gen_tokens), ("--num-trials", num_trials),
                    ("--batch-size", batch_size)):
        if v < 1:
            raise ParrotError(f"{name} must be >= 1 (got {v})")
    picture = False if no_image else open_image(image, ImageSettings()) if image is not None else None
    backend = backend or default_backend()
    click.echo(f"Loading {model_path} ({backend})...", err=True)
    model = parrot.load(model_path, backend=backend, dtype=dtype, vision_tower=vision_tower, adapter=adapter_path)
    what = "none" if no_image else image or "synthetic"
    visual = 0 if no_image else model.num_visual_tokens
    click.echo("Running warmup..")
    click.echo(f"Timing with prompt_tokens={prompt_tokens} (+{visual} visual), generation_tokens={gen_tokens}, "
               f"batch_size={batch_size}, image={what}, backend={backend}, dtype={model.dtype}.")
    trials = run_benchmark(model, prompt_tokens, gen_tokens, picture, num_trials, batch_size,
                           on_trial=lambda i, t: click.echo(format_trial(i, t)))
    click.echo(format_averages(trials))
