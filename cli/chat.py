"""`parrot chat`: answer about an image once (--prompt), or an interactive multi-turn session."""

from __future__ import annotations

import sys

import click

from . import common


def _lenient_streams() -> None:
    """Never die on a console that cannot show (or send) a character: replace it instead."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError):
            pass


def _line_editing() -> None:
    """Arrow keys and history at the >> prompt, when a person types."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (input() uses it once imported)
        except ImportError:
            pass


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("image", required=False)
@click.option("--model", "model_path", default=common.DEFAULT_MODEL, show_default=True,
              help="Model directory (official or MLX layout) or a hub id.")
@common.backend_option()
@click.option("--prompt", "-p", default=None, help="Answer this once and exit (otherwise: interactive chat).")
@common.sampling_options()
@common.system_option()
@common.dtype_option()
@common.vision_tower_option()
@common.adapter_option()
@click.option("--verbose", "-v", is_flag=True, help="Print speed and memory figures after each answer (stderr).")
def chat(image, model_path, backend, prompt, max_tokens, temp, top_p, seed, system, dtype, vision_tower, adapter_path,
         verbose):
    """Chat with Parrot about IMAGE (optional: without it the chat is text only).

    Interactive commands: /image PATH switches image (a new conversation), /clear forgets the
    conversation, /exit or Ctrl-D quits.
    """
    import parrot
    from parrot.inference.chat import ChatSession
    from parrot.model.image import ImageSettings, open_image
    from parrot.registry import default_backend

    from .repl import HELP, printable, run_repl

    _lenient_streams()
    sampling = common.sampling_settings(max_tokens, temp, top_p, seed)  # bad values fail before the model loads
    picture = open_image(image, ImageSettings()) if image is not None else None  # so does a bad image
    backend = backend or default_backend()
    click.echo(f"Loading {model_path} ({backend})...", err=True)
    model = parrot.load(model_path, backend=backend, dtype=dtype, vision_tower=vision_tower, adapter=adapter_path)
    session = ChatSession(model, picture, system)
    if prompt is not None:
        stream = session.ask(prompt, **sampling)
        for piece in stream:
            sys.stdout.write(printable(piece))  # an answer's control characters never reach the terminal
            sys.stdout.flush()
        sys.stdout.write("\n")
        if verbose:
            click.echo(stream.result.summary(), err=True)
        return
    what = f"image {image}" if image is not None else "no image (text only)"
    click.echo(f"Chatting about {what}. {HELP}", err=True)
    _line_editing()
    run_repl(session, sampling, verbose=verbose)

