"""`parrot`: the command group. Commands live in their own modules and are imported lazily, so
`parrot --help` stays fast and a Mac without torch never imports it."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from parrot import __version__
from parrot.errors import ParrotError

# command name -> (module, function, one-line help)
COMMANDS = {
    "demo": ("parrot.cli.demo", "demo", "The shipped demo Parrot answers about pictures in six languages."),
    "chat": ("parrot.cli.chat", "chat", "Chat about an image (streamed answers; interactive or --prompt)."),
    "convert": ("parrot.cli.convert", "convert", "Convert between official, MLX (quantized), DeepSpeed/DCP layouts."),
    "train": ("parrot.cli.train", "train", "Train stage 1 / stage 2 (torch: cpu/cuda, DeepSpeed, FSDP2; mlx)."),
    "generate": ("parrot.cli.generate", "generate", "Answer a JSONL file of (image, prompt) requests, resumably."),
    "bench": ("parrot.cli.bench", "bench", "Measure prompt/generation tokens per second and peak memory."),
    "inspect": ("parrot.cli.inspect", "inspect", "Look inside a model: the MoE's routing weights per language."),
    "eval": ("parrot.cli.eval", "eval_command", "Evaluate on MMMB / multilingual MMBench, scored as VLMEvalKit does."),
    "serve": ("parrot.cli.serve", "serve", "OpenAI-compatible server (images, streaming, batching) + chat page."),
}


def _available(name: str) -> bool:
    return importlib.util.find_spec(COMMANDS[name][0]) is not None


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [n for n in COMMANDS if _available(n)]

    def get_command(self, ctx, name):
        if name not in COMMANDS or not _available(name):
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(n, COMMANDS[n][2]) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="parrot")
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True,
              help="Passed by the deepspeed launcher; ignored (LOCAL_RANK is read from the environment).")
def cli(local_rank: int | None) -> None:
    """Parrot: multilingual vision-language model, PyTorch and MLX backends."""


def _clear_progress_bars() -> None:
    """Erases the progress bars still open (a loop left by an exception or Ctrl-C does not close its bar,
    which tqdm would otherwise draw again at exit, below the message)."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)  # no bar was ever made unless tqdm is imported
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = False  # the last state drawn stays on screen above; close() clears the bar's own line
        try:
            bar.close()
        except (OSError, ValueError):  # stderr already closed
            pass


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line to stderr and exit 1, without a traceback."""
    try:
        cli.main(args=argv, prog_name="parrot", standalone_mode=False)
    except ParrotError as e:
        _clear_progress_bars()
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        _clear_progress_bars()
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        _clear_progress_bars()
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _clear_progress_bars()
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
