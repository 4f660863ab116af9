"""CLI conventions: the same flag spelled the same way in every command (--vision-tower DIR|ID, --adapter on
chat, generate and bench), mlx-lm's names accepted, messages naming the flags, answers shown without raw
control characters."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import parrot
from conftest import requires_torch
from parrot.cli.main import COMMANDS, cli
from parrot.errors import ParrotError
from parrot.storage.safetensors_io import CheckpointFiles

CLI_DIR = Path(__file__).parents[1] / "cli"


def help_text(command: str) -> str:
    result = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def parse(command: str, args: list[str]) -> dict:
    cmd = cli.get_command(None, command)
    return cmd.make_context(command, args).params


@pytest.mark.parametrize("command", ["chat", "generate", "bench", "convert", "train"])
def test_vision_tower_reads_dir_or_id_in_every_command(command):
    assert "--vision-tower DIR|ID" in help_text(command)


def test_mlx_lm_flag_names_are_accepted_and_shown():
    for command in ("chat", "generate", "bench"):
        assert "--adapter, --adapter-path DIR" in help_text(command)
    for command in ("chat", "generate"):
        assert "--system, --system-prompt" in help_text(command)
    assert "--max-steps, --iters" in help_text("train") and "--lr, --learning-rate" in help_text("train")
    chat = parse("chat", ["--adapter-path", "ad", "--system-prompt", "Be brief."])
    assert (chat["adapter_path"], chat["system"]) == ("ad", "Be brief.")
    gen = parse("generate", ["-i", "in.jsonl", "-o", "out.jsonl", "--adapter-path", "ad", "--system-prompt", "S"])
    assert (gen["adapter_path"], gen["system"]) == ("ad", "S")
    assert parse("bench", ["--model", "m", "--adapter-path", "ad"])["adapter_path"] == "ad"
    assert "--fuse-adapter, --adapter-path DIR" in help_text("convert")  # mlx_lm.fuse's name
    assert parse("convert", ["src", "dst", "--adapter-path", "ad"])["adapter"] == "ad"
    train = parse("train", ["--stage", "2", "--data", "d.json", "--output", "o", "--iters", "7",
                            "--learning-rate", "0.5"])
    assert (train["max_steps"], train["lr"]) == (7, 0.5)
    assert parse("train", ["--stage", "2", "--data", "d.json", "--output", "o"])["backend"] is None  # by machine


def test_commands_import_no_helper_from_a_sibling_command():
    for name, (module, _, _) in COMMANDS.items():
        tree = ast.parse((CLI_DIR / f"{module.rsplit('.', 1)[1]}.py").read_text())
        siblings = {m.rsplit(".", 1)[1] for m, _, _ in COMMANDS.values()} - {name}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module not in siblings, f"cli/{name}.py imports from cli/{node.module}.py"


def write_adapter(base: Path, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter on q_proj and v_proj of every layer, with random (non-zero) A and B."""
    from parrot.model.config import ParrotConfig
    from parrot.model.layout import mlx_to_official_key
    from parrot.training.adapter import adapter_config, save_adapter, target_modules

    cfg = ParrotConfig.from_file(base / "config.json")
    files, rng, rank = CheckpointFiles(base), np.random.default_rng(seed), 4
    modules = target_modules(cfg, ["q_proj", "v_proj"])
    weights = {}
    for m in modules:
        n_out, n_in = files.info(mlx_to_official_key(f"{m}.weight")).shape
        weights[f"{m}.lora_a"] = rng.standard_normal((n_in, rank)).astype(np.float32) * 0.1
        weights[f"{m}.lora_b"] = rng.standard_normal((rank, n_out)).astype(np.float32) * 0.1
    save_adapter(out, adapter_config(rank, 2.0, 0.0, None, ["q_proj", "v_proj"], modules, cfg, str(base), None,
                                     extra={"stage": 2, "use_moe": True}), weights)
    return out


@requires_torch
def test_generate_and_bench_apply_the_adapter(tiny_ckpt, tmp_path):
    adapter = write_adapter(tiny_ckpt, tmp_path / "adapter")
    adapted = parrot.load(tiny_ckpt, backend="cpu", adapter=adapter)
    plain = parrot.load(tiny_ckpt, backend="cpu")
    ids = plain.encode_prompt("Hi", has_image=False)
    assert np.abs(adapted.logits(ids) - plain.logits(ids)).max() > 1e-3  # the adapter matters
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "prompt": "Hi"}\n{"id": "b", "prompt": "Resimde ne var?"}\n')
    out = tmp_path / "out.jsonl"
    run = CliRunner().invoke(cli, ["generate", "--backend", "cpu", "--model", str(tiny_ckpt), "--adapter-path",
                                   str(adapter), "-i", str(inp), "-o", str(out), "-m", "6", "--quiet"])
    assert run.exit_code == 0, run.output
    got = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert got == [adapted.generate(p, max_tokens=6).text for p in ("Hi", "Resimde ne var?")]
    bench = ["bench", "--backend", "cpu", "--model", str(tiny_ckpt), "--no-image", "-p", "4", "-g", "2", "-n", "1"]
    run = CliRunner().invoke(cli, [*bench, "--adapter", str(adapter)])
    assert run.exit_code == 0 and "Averages:" in run.stdout, run.output
    run = CliRunner().invoke(cli, [*bench, "--adapter", str(tmp_path / "none")])
    assert isinstance(run.exception, ParrotError) and "--adapter" in str(run.exception)


def test_chat_shows_control_characters_as_visible_escapes(monkeypatch):
    from parrot.inference.chat import ChatSession
    from parrot.inference.generation import GenerationResult, TextStream

    answer = ["ok\x1b[31m", "red\x07\r\n", "\x9b2J\tend\x00"]
    monkeypatch.setattr(parrot, "load", lambda *a, **k: object())
    monkeypatch.setattr(ChatSession, "ask", lambda self, prompt, **kw: TextStream(iter(answer), GenerationResult()))
    shown = "ok\\x1b[31mred\\x07\\x0d\n\\x9b2J\tend\\x00"
    once = CliRunner().invoke(cli, ["chat", "--backend", "cpu", "--model", "m", "--prompt", "hi"])
    assert once.exit_code == 0, once.output
    assert once.stdout == shown + "\n"
    repl = CliRunner().invoke(cli, ["chat", "--backend", "cpu", "--model", "m"], input="hi\n/exit\n")
    assert repl.exit_code == 0, repl.output
    assert shown in repl.stdout and "\x1b" not in repl.stdout and "\r" not in repl.stdout
