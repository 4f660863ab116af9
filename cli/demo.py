"""`parrot demo`: the bundled demo Parrot answers questions about pictures in six languages."""

from __future__ import annotations

import time
import unicodedata
from pathlib import Path

import click

from . import common


def _width(text: str) -> int:
    """Terminal columns of a text (East Asian wide characters take two)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(1, width - _width(text))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", default="demo", show_default=True,
              help="Model directory; `demo` is the small Parrot shipped with the package.")
@common.backend_option()
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False),
              help="Ask about this image instead of the bundled ones (repeatable).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Compute dtype (the demo is tiny: float32 gives both backends the same answers).")
@click.option("--max-tokens", "-m", default=24, show_default=True, type=click.IntRange(1, 512),
              help="Most new tokens per answer.")
def demo(model_path, backend, images, dtype, max_tokens):
    """Show the demo Parrot: it looks at a few bundled pictures of shapes (which it never saw in training)
    and answers questions about their colour, shape, position and number in English, Chinese,
    Portuguese, Arabic, Turkish and Russian.

    \b
    Examples:
      parrot demo
      parrot demo --backend mlx
      parrot demo --image my_drawing.png
    """
    import parrot
    from parrot.demo.showcase import bundled_images, questions_for
    from parrot.model.image import ImageSettings, open_image
    from parrot.registry import default_backend

    pictures = [(Path(p), open_image(p, ImageSettings())) for p in images]  # a bad image fails before loading
    if not pictures:
        pictures = [(p, open_image(p, ImageSettings())) for p in bundled_images()]
    backend = backend or default_backend()
    t = time.perf_counter()
    model = parrot.load(model_path, backend=backend, dtype=dtype)
    click.echo(f"Loaded {model_path} on {backend} in {time.perf_counter() - t:.1f} s.\n")
    for path, picture in pictures:
        click.echo(f"{path.name}" + ("" if images else f"  ({path})"))
        for lang, question in questions_for(None if images else path.stem):
            t = time.perf_counter()
            answer = model.generate(question, picture, max_tokens=max_tokens).text
            ms = (time.perf_counter() - t) * 1000
            click.echo(f"  {lang}  {_pad(question, 40)} {_pad(answer, 34)} {ms:6.0f} ms")
        click.echo("")
