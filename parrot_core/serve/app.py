"""The HTTP side of `parrot serve`: a FastAPI app with OpenAI's chat-completions API, run by uvicorn.

Endpoints: POST /v1/chat/completions (streamed with Server-Sent Events when asked), GET /v1/models,
GET /health, and the chat page at /. Every error is answered in OpenAI's shape
{"error": {"message", "type", "param", "code"}} with a 4xx status (503 when busy or stopping); the
model work happens on the scheduler's thread (parrot.serve.scheduler), so a bad request never touches
it. A pure ASGI middleware bounds the request body, checks the API key and logs one line per request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ParrotError
from ..inference.generation import SamplingParams
from ..model.prompt import format_conversation
from .images import image_bytes
from .protocol import APIError, ChatRequest, Limits, parse_chat_request
from .scheduler import Job, Scheduler


@dataclass
class ServeSettings:
    model_name: str  # what --model said (requests may name it)
    model_id: str  # the id GET /v1/models lists
    max_batch: int = 8
    max_queue: int = 64
    api_key: str | None = None
    allowed_local_dir: Path | None = None
    max_body_bytes: int = 32 << 20
    limits: Limits = None  # type: ignore[assignment]

    def __post_init__(self):
        self.limits = self.limits or Limits()
        if self.allowed_local_dir is not None:
            self.allowed_local_dir = Path(self.allowed_local_dir).resolve()


def _error(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class Guard:
    """Pure ASGI middleware: body size bound, Bearer API key on /v1, one log line per request."""

    def __init__(self, app, settings: ServeSettings, log: Callable[[str], None]):
        self.app, self.settings, self.log = app, settings, log
        self.scheduler: Scheduler | None = None  # create_app's, stopped first on Ctrl-C

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]
        state = scope.setdefault("state", {})

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            self._check(scope)
            limit, seen = self.settings.max_body_bytes, [0]

            async def receiving():
                message = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > limit:
                        raise APIError(413, f"request body too large (over {limit:,} bytes)")
                return message

            await self.app(scope, receiving, sending)
        except APIError as e:
            if not status[0]:
                await _error(e)(scope, receive, sending)
        finally:
            usage = state.get("usage")
            tokens = f" prompt={usage[0]} completion={usage[1]} tokens" if usage else ""
            client = (scope.get("client") or ("-",))[0]
            self.log(f'{client} "{scope["method"]} {scope["path"]}" {status[0] or "-"}{tokens} '
                     f"{time.perf_counter() - t0:.2f} s{' (client left)' if state.get('left') else ''}")

    def _check(self, scope) -> None:
        headers = dict(scope.get("headers") or [])
        size = headers.get(b"content-length", b"")
        if size.isdigit() and int(size) > self.settings.max_body_bytes:
            raise APIError(413, f"request body too large ({int(size):,} bytes; at most "
                                f"{self.settings.max_body_bytes:,})")
        key = self.settings.api_key
        if key and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")


def create_app(model, settings: ServeSettings, log: Callable[[str], None] | None = None) -> FastAPI:
    """The app for a loaded `ParrotModel`; its scheduler thread starts and stops with the app's lifespan."""
    from contextlib import asynccontextmanager

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    scheduler = Scheduler(model, settings.max_batch, settings.max_queue, log=log)
    limits = settings.limits
    context = int(model.config.max_position_embeddings)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="Parrot", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return _error(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return _error(APIError(400, str(e)))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log(f"internal error: {type(e).__name__}: {e}")
        return _error(APIError(500, f"internal error ({type(e).__name__})"))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files(__package__).joinpath("static/chat.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_id, "backend": model.backend,
                "max_batch": settings.max_batch, "running": scheduler.running, "peak_running": scheduler.peak_running,
                "queued": scheduler.queued,
                "vision": {"computed": scheduler.vision_computed, "cached": scheduler.vision_cached},
                "auth": settings.api_key is not None}

    def model_card() -> dict:
        return {"id": settings.model_id, "object": "model", "created": int(time.time()), "owned_by": "parrot"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name not in (settings.model_id, settings.model_name):
            raise APIError(404, f"model {name!r} not found; this server serves {settings.model_id!r}", "model",
                           "model_not_found")
        return model_card()

    def prepare(req: ChatRequest) -> Job:
        """Image download and preprocessing, tokenization, length checks (a worker thread, not the model's)."""
        pixels = None
        if req.image_url is not None:
            data = image_bytes(req.image_url, limits, settings.allowed_local_dir)
            try:
                pixels = model.preprocess(data)
            except ParrotError as e:
                raise APIError(400, str(e).replace("<bytes>: ", "image: "), "messages.content.image_url") from None
        try:
            ids = format_conversation(model.tokenizer, req.turns, generation_preface="").input_ids
        except ParrotError as e:
            raise APIError(400, str(e), "messages") from None
        length = len(ids) - 1 + model.num_visual_tokens if pixels is not None else len(ids)
        room = context - length
        if room < 1:
            raise APIError(400, f"the prompt is {length} tokens long, over the model's context of {context}",
                           "messages", "context_length_exceeded")
        max_tokens = req.max_tokens or max(1, min(limits.default_max_tokens, limits.max_tokens, room))
        if max_tokens > room:
            raise APIError(400, f"the prompt ({length} tokens) and max_tokens ({max_tokens}) exceed the "
                                f"model's context of {context} tokens", "max_tokens", "context_length_exceeded")
        try:
            params = SamplingParams(max_tokens, req.temperature, req.top_p, req.seed).with_seed()
        except ParrotError as e:
            raise APIError(400, str(e)) from None
        return Job(ids, pixels, params, emit=lambda kind, data: None, stop=req.stop)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        req = parse_chat_request(body, limits)
        if req.model not in (settings.model_id, settings.model_name):
            raise APIError(404, f"model {req.model!r} not found; this server serves {settings.model_id!r}",
                           "model", "model_not_found")
        job = await run_in_threadpool(prepare, req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind, data):
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, data))
            except RuntimeError:  # the event loop is gone (shutting down)
                job.cancel()

        job.emit = emit
        scheduler.submit(job)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        state = request.scope.setdefault("state", {})

        def usage() -> dict:
            state["usage"] = (job.prompt_tokens, job.completion_tokens)
            return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
                    "total_tokens": job.prompt_tokens + job.completion_tokens}

        if req.stream:
            return StreamingResponse(_sse(job, events, cid, created, settings.model_id, req.include_usage, usage,
                                          state), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces = []
        try:
            while True:
                try:
                    kind, data = await asyncio.wait_for(events.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        state["left"] = True
                        return Response(status_code=499)
                    continue
                if kind == "delta":
                    pieces.append(data)
                elif kind == "error":
                    raise data
                else:
                    break
        except asyncio.CancelledError:
            job.cancel()
            raise
        return {"id": cid, "object": "chat.completion", "created": created, "model": settings.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "finish_reason": job.finish_reason, "logprobs": None}],
                "usage": usage(), "system_fingerprint": None}

    guard = Guard(app, settings, log)
    guard.scheduler = scheduler
    return guard


async def _sse(job: Job, events: asyncio.Queue, cid: str, created: int, model_id: str, include_usage: bool,
               usage: Callable[[], dict], state: dict):
    """The Server-Sent Events of a streamed answer (OpenAI's chunk shapes); the job is cancelled if the
    client goes away (Starlette cancels this generator)."""

    def chunk(delta: dict, finish: str | None = None) -> str:
        c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if include_usage:
            c["usage"] = None
        return f"data: {json.dumps(c, ensure_ascii=False)}\n\n"

    done = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, data = await events.get()
            if kind == "delta":
                yield chunk({"content": data})
            elif kind == "error":
                yield f"data: {json.dumps(data.body(), ensure_ascii=False)}\n\n"
                break
            else:
                yield chunk({}, job.finish_reason)
                u = usage()
                if include_usage:
                    yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                                 "model": model_id, "choices": [], "usage": u}) + "\n\n"
                break
        yield "data: [DONE]\n\n"
        done = True
    finally:
        if not done:
            job.cancel()
            state["left"] = True


def serve(model, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8080,
          log: Callable[[str], None] | None = None, ready: Callable[[str], None] | None = None) -> None:
    """Binds host:port (port 0: a free one), calls `ready(url)`, serves until Ctrl-C (or SIGTERM)."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ParrotError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") \
            from None
    sock.listen(128)
    sock.set_inheritable(True)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    app = create_app(model, settings, log)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # Ctrl-C: answers in progress end now (a 503 error event / response), so their connections close
            # at once and uvicorn's graceful shutdown does not wait for them
            await asyncio.to_thread(app.scheduler.stop)
            await super().shutdown(sockets)

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3, lifespan="on")
    server = Server(config)
    if ready is not None:
        ready(f"http://{shown}:{bound}")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after shutting down cleanly
        pass
    finally:
        sock.close()
