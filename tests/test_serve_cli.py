"""`parrot serve`'s command line: the shared flag spellings, and clean one-line failures before serving."""

from __future__ import annotations

import socket

from click.testing import CliRunner

from conftest import assert_clean_failure, requires_mlx, requires_torch, run_parrot, run_parrot_here, without_packages
from parrot.cli.main import cli


def test_help_shows_the_shared_flags_and_the_safe_default_host():
    out = CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200).output
    for flag in ("--vision-tower DIR|ID", "--adapter, --adapter-path DIR", "--max-batch", "--api-key",
                 "--allowed-local-dir", "--dtype", "[default: 127.0.0.1]", "--port INTEGER RANGE"):
        assert flag in out, flag


def test_bad_settings_fail_before_the_model_loads(tmp_path):
    assert_clean_failure(run_parrot_here("serve", "--model", tmp_path / "none", "--max-tokens", "10",
                                         "--max-tokens-limit", "5"), "--max-tokens-limit")
    assert_clean_failure(run_parrot_here("serve", "--model", tmp_path / "none", "--api-key", " "), "--api-key")
    assert_clean_failure(run_parrot_here("serve", "--model", tmp_path / "none", "--allowed-local-dir",
                                         tmp_path / "missing"), "--allowed-local-dir")
    assert_clean_failure(run_parrot_here("serve", "--model", tmp_path / "none", "--backend", "cpu"), "none")


@requires_torch
def test_a_port_in_use_is_one_clear_error(tiny_ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert_clean_failure(run_parrot_here("serve", "--model", tiny_ckpt, "--backend", "cpu", "--port", str(port)),
                             f"cannot listen on 127.0.0.1:{port}", "--port")


def test_without_the_serve_extra_it_says_what_to_install(tmp_path):
    p = run_parrot("serve", "--model", tmp_path, env=without_packages("fastapi"))
    assert_clean_failure(p, "parrot-vlm[serve]")


@requires_mlx
def test_an_mlx_server_never_imports_torch(tiny_ckpt):
    """A Mac installs [mlx,serve] without torch: the server's modules must not need it."""
    import subprocess
    import sys

    code = ("import sys, parrot, parrot.cli.serve; from parrot.serve.app import ServeSettings, create_app; "
            f"m = parrot.load({str(tiny_ckpt)!r}, backend='mlx'); create_app(m, ServeSettings('m', 'm')); "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, **without_packages("torch")})
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stderr
