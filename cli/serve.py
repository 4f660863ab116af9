"""`parrot serve`: an OpenAI-compatible server (chat completions with images, streaming, continuous
batching) and a chat page in the browser."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click

from . import common


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", default=common.DEFAULT_MODEL, show_default=True,
              help="Model directory (official or MLX layout) or a hub id.")
@common.backend_option()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 exposes the server to the network: use --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port (0: any free one).")
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Most requests decoded together (continuous batching).")
@click.option("--max-queue", type=click.IntRange(1, 100000), default=64, show_default=True,
              help="Most requests waiting for a batch slot; more get 503.")
@click.option("--max-tokens", "-m", type=click.IntRange(1), default=512, show_default=True,
              help="Answer length when a request does not set max_tokens.")
@click.option("--max-tokens-limit", type=click.IntRange(1), default=4096, show_default=True,
              help="Most tokens a request may ask for.")
@click.option("--api-key", default=None, envvar="PARROT_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on /v1 requests.")
@click.option("--allowed-local-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Let requests name image files by path, only inside this directory.")
@click.option("--remote-images/--no-remote-images", default=True, show_default=True,
              help="Download http(s) image URLs (off: only data: URLs and --allowed-local-dir paths).")
@common.dtype_option()
@common.vision_tower_option()
@common.adapter_option()
def serve(model_path, backend, host, port, max_batch, max_queue, max_tokens, max_tokens_limit, api_key,
          allowed_local_dir, remote_images, dtype, vision_tower, adapter_path):
    """Serve Parrot over HTTP: OpenAI's /v1/chat/completions (text and image_url parts, streaming),
    /v1/models, /health, and a chat page at /.

    \b
    Images: data: URLs (base64), http(s) URLs, or local paths under --allowed-local-dir.
    Ctrl-C stops the server.
    """
    from parrot.errors import ParrotError

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ParrotError(f"parrot serve needs {' and '.join(missing)}: pip install 'parrot-vlm[serve]'")
    if max_tokens > max_tokens_limit:
        raise ParrotError(f"--max-tokens ({max_tokens}) is over --max-tokens-limit ({max_tokens_limit})")
    if api_key is not None and not api_key.strip():
        raise ParrotError("--api-key is empty")

    import parrot
    from parrot.registry import default_backend
    from parrot.serve.app import ServeSettings
    from parrot.serve.app import serve as run_server
    from parrot.serve.protocol import Limits

    backend = backend or default_backend()
    click.echo(f"Loading {model_path} ({backend})...", err=True)
    model = parrot.load(model_path, backend=backend, dtype=dtype, vision_tower=vision_tower, adapter=adapter_path)
    local = Path(model_path)
    model_id = local.name if local.is_dir() else str(model_path)
    settings = ServeSettings(model_name=str(model_path), model_id=model_id, max_batch=max_batch, max_queue=max_queue,
                             api_key=api_key, allowed_local_dir=allowed_local_dir,
                             limits=Limits(max_tokens=max_tokens_limit, default_max_tokens=max_tokens,
                                           remote_images=remote_images))

    def ready(url: str) -> None:
        click.echo(f"Serving {model_id} ({backend}, --max-batch {max_batch}) at {url}", err=True)
        click.echo(f"  chat page: {url}/   OpenAI API: {url}/v1   (Ctrl-C stops)", err=True)
        if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
            click.echo("  warning: listening beyond this machine without --api-key", err=True)

    run_server(model, settings, host, port, ready=ready)
    click.echo("Server stopped.", err=True)
