"""Options and checks shared by the commands (one definition each; a command never imports another)."""

from __future__ import annotations

from collections.abc import Callable

import click

from parrot.registry import NAMES as BACKENDS

DEFAULT_MODEL = "AIDC-AI/Parrot-7B"
# the CLI's names for SamplingParams' fields, so that messages name the flags
SAMPLING_FLAGS = {"max_tokens": "--max-tokens", "temperature": "--temp", "top_p": "--top-p", "seed": "--seed"}


def backend_option(choices=BACKENDS) -> Callable:
    return click.option("--backend", type=click.Choice(list(choices)), default=None,
                        help="Default: mlx on Apple silicon, cuda when a GPU is visible, else cpu.")


TOWER_HELP = "CLIP tower directory or hub id, when the checkpoint's does not resolve."


def vision_tower_option(help: str = TOWER_HELP) -> Callable:
    return click.option("--vision-tower", default=None, metavar="DIR|ID", help=help)


def adapter_option() -> Callable:
    """mlx-lm's --adapter-path is accepted too."""
    return click.option("--adapter", "--adapter-path", "adapter_path", default=None, metavar="DIR",
                        help="LoRA adapter (parrot train --lora's output) trained on --model.")


def system_option() -> Callable:
    """mlx-lm's --system-prompt is accepted too."""
    return click.option("--system", "--system-prompt", "system", default=None,
                        help='System prompt (default "You are a helpful assistant.").')


def sampling_options(seed_help: str = "Seed for sampling (reproducible answers).") -> Callable:
    """--max-tokens/-m, --temp, --top-p, --seed (mlx-lm's names)."""
    options = [
        click.option("--max-tokens", "-m", type=int, default=256, show_default=True, help="Most tokens per answer."),
        click.option("--temp", type=float, default=0.0, show_default=True, help="Sampling temperature (0: greedy)."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling threshold."),
        click.option("--seed", type=int, default=None, help=seed_help),
    ]

    def apply(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f

    return apply


def dtype_option() -> Callable:
    from parrot.model.schema import DTYPES

    return click.option("--dtype", type=click.Choice(list(DTYPES)), default=None, help="Default: the checkpoint's.")


def sampling_settings(max_tokens: int, temp: float, top_p: float, seed: int | None) -> dict:
    """The sampling flags as SamplingParams' arguments, checked (a bad value names its flag)."""
    from parrot.inference.generation import SamplingParams

    SamplingParams.check(max_tokens, temp, top_p, seed, names=SAMPLING_FLAGS)
    return dict(max_tokens=max_tokens, temperature=temp, top_p=top_p, seed=seed)
