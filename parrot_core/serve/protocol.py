"""The OpenAI chat-completions request, checked field by field, and OpenAI's error shape.

A request becomes a `ChatRequest`: the conversation as ChatML turns (the template `parrot chat` uses,
parrot.model.prompt), at most one image (where it appeared), and sampling settings. Anything wrong is
an `APIError` with the HTTP status and the field (`param`) it is about.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..constants import DEFAULT_IMAGE_TOKEN
from ..model.prompt import move_image_to_front


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
             413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
             503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


@dataclass
class Limits:
    """What one request may ask for (parrot serve's flags)."""

    max_tokens: int = 4096  # the most tokens an answer may request
    default_max_tokens: int = 512  # when the request names none
    max_image_bytes: int = 20 << 20  # an image's encoded size (data: URL or download)
    fetch_timeout: float = 10.0  # seconds for an http(s) image, in all
    remote_images: bool = True  # download http(s) image URLs
    max_messages: int = 256


@dataclass
class ChatRequest:
    turns: list[dict]  # [{"from": "system"|"human"|"gpt", "value": str}], ChatML order; "<image>\n" where it goes
    image_url: str | None  # the one image's URL (data:, http(s) or a local path), None for text only
    max_tokens: int | None  # None: the server's default (bounded by the context left)
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    model: str = ""


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
        raise bad(f"'{name}' must be a number in [{low:g}, {high:g}] (got {v!r})", name)
    return float(v)


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    """Checks an OpenAI chat-completions body; raises APIError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: a string (see GET /v1/models)", "model")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise bad("only n=1 is supported", "n")
    if body.get("logprobs"):
        raise bad("logprobs are not supported", "logprobs")
    if body.get("tools"):
        raise bad("tools are not supported by Parrot", "tools")

    turns, image_url = _conversation(body.get("messages"), limits)

    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):
        v = body.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limits.max_tokens:
            raise bad(f"'{name}' must be an integer in [1, {limits.max_tokens}] (got {v!r})", name)
        max_tokens = v if max_tokens is None else max_tokens
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("'top_p' must be > 0 (1 keeps every token)", "top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise bad(f"'seed' must be a non-negative integer (got {seed!r})", "seed")

    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad("'stop' must be a non-empty string or a list of up to 4 of them", "stop")

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad("'stream_options.include_usage' must be true or false", "stream_options")
    return ChatRequest(turns, image_url, max_tokens,
                       temperature, top_p, None if seed is None else seed % 2**31, stop, stream, include_usage,
                       model)


ROLES = {"system": "system", "developer": "system", "user": "human", "assistant": "gpt"}


def _conversation(messages: Any, limits: Limits) -> tuple[list[dict], str | None]:
    """ChatML turns (system first) and the image URL, from OpenAI `messages`.

    As `parrot chat` builds them (parrot.model.prompt.inference_conversation): the default system prompt
    unless the request gives one, `<image>\\n` in front of the text of the user turn that holds the image,
    a literal `<image>` removed from every other turn."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    if len(messages) > limits.max_messages:
        raise bad(f"too many messages ({len(messages)}; at most {limits.max_messages})", "messages")
    system: list[str] = []
    turns: list[dict] = []
    image_url = None
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{param} must be an object with 'role' and 'content'", param)
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{param}.role must be one of system, user, assistant (got {role!r})", f"{param}.role")
        text, url = _content(m.get("content"), f"{param}.content", role == "user")
        if url is not None:
            if image_url is not None:
                raise bad("Parrot sees one image per conversation: this request has a second one "
                          "(start a new conversation for another image)", f"{param}.content")
            image_url = url
        if ROLES[role] == "system":
            system.append(text)
            continue
        if url is not None:
            text = move_image_to_front(text) if DEFAULT_IMAGE_TOKEN in text else DEFAULT_IMAGE_TOKEN + "\n" + text
        else:
            text = text.replace(DEFAULT_IMAGE_TOKEN, "")
        turns.append({"from": ROLES[role], "value": text})
    if not turns or turns[-1]["from"] != "human":
        raise bad("the last message must be the user's", "messages")
    head = [{"from": "system", "value": "\n".join(system)}] if system else []
    return head + turns, image_url


def _content(content: Any, param: str, images_allowed: bool) -> tuple[str, str | None]:
    """The text of a message's content (a string, or a list of parts) and its image URL if any."""
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise bad(f"{param} must be a string or a list of content parts", param)
    texts, url = [], None
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad(f"{p}.text must be a string", f"{p}.text")
            texts.append(part["text"])
        elif kind == "image_url":
            if not images_allowed:
                raise bad(f"{p}: only user messages may hold an image", p)
            spec = part.get("image_url")
            u = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(u, str) or not u:
                raise bad(f"{p}.image_url.url must be a non-empty string", f"{p}.image_url")
            if url is not None:
                raise bad("Parrot sees one image per conversation: this message has a second one", p)
            url = u
        else:
            raise bad(f"{p}: unsupported content part (use {{'type': 'text'}} or {{'type': 'image_url'}})", p)
    return "\n".join(texts), url
