"""`parrot serve` with the official `openai` client against a real uvicorn on a loopback port: answers
equal `parrot chat`'s and one-by-one generation, streaming, usage, multi-turn with the vision cache,
concurrent clients batched, every bad request a 4xx JSON error with the server still up, a client
that leaves mid-stream frees its slot, Ctrl-C stops cleanly."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import parrot
from conftest import BACKENDS, random_image, run_parrot_here
from parrot.cli.repl import printable
from serve_helpers import API_KEY, Server, never_stopping_checkpoint

openai = pytest.importorskip("openai")
QUESTION = "What is in the picture?"


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    ckpt = never_stopping_checkpoint(d / "parrot-tiny")
    allowed = d / "allowed"
    allowed.mkdir()
    random_image(41, 27, seed=3).save(allowed / "photo.png")
    random_image(30, 30, seed=9).save(d / "outside.png")
    return ckpt, allowed


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, files):
    ckpt, allowed = files
    s = Server(ckpt, request.param, "--api-key", API_KEY, "--allowed-local-dir", str(allowed), "--max-batch", "8")
    s.backend, s.ckpt, s.allowed = request.param, ckpt, allowed
    yield s
    s.interrupt()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(server):
    """The same checkpoint loaded here: one-by-one answers to compare with."""
    return parrot.load(server.ckpt, backend=server.backend)


def image_message(url: str, text: str) -> dict:
    return {"role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}


def ask(client, messages, stream=False, **kw):
    """(text, finish_reason, usage) of a completion, streamed or not."""
    if not stream:
        r = client.chat.completions.create(model="parrot-tiny", messages=messages, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    text, finish, usage = "", None, None
    for chunk in client.chat.completions.create(model="parrot-tiny", messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish, usage


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_answer_equals_parrot_chat_with_an_image_and_text_only(server, client, stream):
    photo = server.allowed / "photo.png"
    for image, messages in [
        (photo, [image_message(data_url(random_image(41, 27, seed=3)), QUESTION)]),
        (None, [{"role": "user", "content": "Привет! Как дела?"}]),
    ]:
        chat = run_parrot_here("chat", *([str(image)] if image else []), "--model", server.ckpt, "--backend",
                               server.backend, "--prompt", messages[0]["content"] if image is None else QUESTION,
                               "--max-tokens", "12")
        assert chat.returncode == 0, chat.stderr
        text, finish, usage = ask(client, messages, stream, max_tokens=12, temperature=0)
        assert printable(text) + "\n" == chat.stdout
        assert finish == "length" and usage.completion_tokens == 12


def test_usage_counts_prompt_with_visual_tokens_and_answer_tokens(server, client, local):
    url = data_url(random_image(41, 27, seed=3))
    alone = local.generate(QUESTION, random_image(41, 27, seed=3), max_tokens=7)
    for stream in (False, True):
        text, finish, usage = ask(client, [image_message(url, QUESTION)], stream, max_completion_tokens=7)
        assert text == alone.text
        assert usage.prompt_tokens == alone.prompt_tokens > local.num_visual_tokens
        assert usage.completion_tokens == len(alone.tokens) == 7
        assert usage.total_tokens == usage.prompt_tokens + 7


def test_multi_turn_with_the_image_in_the_first_turn_reuses_the_vision_work(server, client, local):
    image = random_image(37, 29, seed=21)  # not seen by the server before
    session = local.chat(image)
    first = session.ask(QUESTION, max_tokens=6).consume().text
    second = session.ask("And what colour is it?", max_tokens=9).consume().text
    before = server.health()["vision"]
    messages = [image_message(data_url(image), QUESTION)]
    assert ask(client, messages, max_tokens=6)[0] == first
    messages += [{"role": "assistant", "content": session.history[0][1]},
                 {"role": "user", "content": "And what colour is it?"}]
    assert ask(client, messages, max_tokens=9)[0] == second
    assert ask(client, messages, stream=True, max_tokens=9)[0] == second
    after = server.health()["vision"]
    assert after["computed"] - before["computed"] == 1  # CLIP ran for the first turn only
    assert after["cached"] - before["cached"] == 2


def test_eight_concurrent_clients_get_their_one_by_one_answers(server, client, local):
    images = [random_image(20 + 3 * i, 25, seed=100 + i) if i % 2 == 0 else None for i in range(8)]
    prompts = [f"Question number {i}: {'what do you see' if images[i] else 'tell me a story'}?" for i in range(8)]
    lengths = [40 + 5 * i for i in range(8)]
    expected = [local.generate(p, im, max_tokens=n).text for p, im, n in zip(prompts, images, lengths)]

    def one(i):
        content = [image_message(data_url(images[i]), prompts[i])] if images[i] else \
            [{"role": "user", "content": prompts[i]}]
        return ask(client, content, stream=i % 3 == 0, max_tokens=lengths[i])[0]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(8)))
    assert got == expected
    health = server.health()
    assert health["peak_running"] >= 2  # the requests really shared the decode batch
    assert health["running"] == 0 and health["queued"] == 0


def test_stop_strings_cut_the_answer(server, client, local):
    full = local.generate("Hi", max_tokens=30).text
    stop = full[12:15]
    cut = full[:full.index(stop)]
    for stream in (False, True):
        text, finish, _ = ask(client, [{"role": "user", "content": "Hi"}], stream, max_tokens=30, stop=[stop, "\x00!"])
        assert (text, finish) == (cut, "stop")


def test_models_lists_the_served_id_and_both_names_are_accepted(server, client):
    assert [m.id for m in client.models.list().data] == ["parrot-tiny"]
    r = client.chat.completions.create(model=str(server.ckpt), messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2)
    assert r.model == "parrot-tiny" and r.usage.completion_tokens == 2


def test_local_paths_only_under_the_allowed_directory(server, client, local):
    photo = server.allowed / "photo.png"
    alone = local.generate(QUESTION, photo, max_tokens=5).text
    assert ask(client, [image_message(str(photo), QUESTION)], max_tokens=5)[0] == alone
    assert ask(client, [image_message("photo.png", QUESTION)], max_tokens=5)[0] == alone
    for bad, status in [(str(server.allowed.parent / "outside.png"), 403),
                        (str(server.allowed / ".." / "outside.png"), 403),
                        ("file://" + str(photo), 400), (str(server.allowed / "missing.png"), 400)]:
        r = post(server, {"model": "parrot-tiny", "messages": [image_message(bad, "hi")]})
        assert r.status_code == status, (bad, r.text)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's shape), with a tiny body."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def post(server, body=None, raw=None, headers=None, path="/v1/chat/completions"):
    h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})}
    import json

    return httpx.post(server.url + path, content=raw if raw is not None else json.dumps(body), headers=h, timeout=30)


def msg(content="hi"):
    return [{"role": "user", "content": content}]


def b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


IMG = {"type": "image_url", "image_url": {"url": "IMAGE"}}
BAD = [  # (name, body or raw bytes, expected status)
    ("not json", b"{bad", 400),
    ("not an object", [1, 2], 400),
    ("no model", {"messages": msg()}, 400),
    ("unknown model", {"model": "gpt-4o", "messages": msg()}, 404),
    ("no messages", {"model": "parrot-tiny"}, 400),
    ("empty messages", {"model": "parrot-tiny", "messages": []}, 400),
    ("messages not a list", {"model": "parrot-tiny", "messages": "hi"}, 400),
    ("message not an object", {"model": "parrot-tiny", "messages": ["hi"]}, 400),
    ("bad role", {"model": "parrot-tiny", "messages": [{"role": "tool", "content": "x"}]}, 400),
    ("content a number", {"model": "parrot-tiny", "messages": msg(5)}, 400),
    ("content null", {"model": "parrot-tiny", "messages": msg(None)}, 400),
    ("unknown part", {"model": "parrot-tiny", "messages": msg([{"type": "audio", "audio": "x"}])}, 400),
    ("text part not a string", {"model": "parrot-tiny", "messages": msg([{"type": "text", "text": 3}])}, 400),
    ("last message not the user's", {"model": "parrot-tiny", "messages": [*msg(), {"role": "assistant",
                                                                                   "content": "x"}]}, 400),
    ("two images in a message", {"model": "parrot-tiny", "messages": msg([IMG, IMG])}, 400),
    ("two images in a conversation", {"model": "parrot-tiny", "messages": [
        {"role": "user", "content": [IMG]}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [IMG]}]},
     400),
    ("image from the assistant", {"model": "parrot-tiny", "messages": [
        {"role": "assistant", "content": [IMG]}, *msg()]}, 400),
    ("image url empty", {"model": "parrot-tiny", "messages": msg([{"type": "image_url", "image_url": {"url": ""}}])},
     400),
    ("bad base64", {"model": "parrot-tiny", "messages": msg([{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,@@@"}}])}, 400),
    ("data url not base64", {"model": "parrot-tiny", "messages": msg([{"type": "image_url", "image_url": {
        "url": "data:image/png,abc"}}])}, 400),
    ("not an image", {"model": "parrot-tiny", "messages": msg([{"type": "image_url", "image_url": {
        "url": b64(b"hello, not a picture")}}])}, 400),
    ("truncated image", {"model": "parrot-tiny", "messages": msg([{"type": "image_url", "image_url": {
        "url": b64(png_claiming(64, 64)[:40])}}])}, 400),
    ("decompression bomb", {"model": "parrot-tiny", "messages": msg([{"type": "image_url", "image_url": {
        "url": b64(png_claiming(60000, 60000))}}])}, 400),
    ("file url", {"model": "parrot-tiny", "messages": msg([{"type": "image_url", "image_url": {
        "url": "file:///etc/passwd"}}])}, 400),
    ("ftp url", {"model": "parrot-tiny", "messages": msg([{"type": "image_url", "image_url": {
        "url": "ftp://example.com/a.png"}}])}, 400),
    ("unreachable http url", {"model": "parrot-tiny", "messages": msg([{"type": "image_url", "image_url": {
        "url": "http://127.0.0.1:9/a.png"}}])}, 400),
    ("max_tokens 0", {"model": "parrot-tiny", "messages": msg(), "max_tokens": 0}, 400),
    ("max_tokens huge", {"model": "parrot-tiny", "messages": msg(), "max_tokens": 10**9}, 400),
    ("max_tokens a string", {"model": "parrot-tiny", "messages": msg(), "max_tokens": "5"}, 400),
    ("max_tokens past the context", {"model": "parrot-tiny", "messages": msg(), "max_tokens": 4090}, 400),
    ("prompt past the context", {"model": "parrot-tiny", "messages": msg("word " * 5000)}, 400),
    ("temperature negative", {"model": "parrot-tiny", "messages": msg(), "temperature": -1}, 400),
    ("temperature nan", b'{"model": "parrot-tiny", "messages": [{"role": "user", "content": "hi"}], '
                        b'"temperature": NaN}', 400),
    ("top_p 0", {"model": "parrot-tiny", "messages": msg(), "top_p": 0}, 400),
    ("seed negative", {"model": "parrot-tiny", "messages": msg(), "seed": -1}, 400),
    ("stop too many", {"model": "parrot-tiny", "messages": msg(), "stop": list("abcde")}, 400),
    ("stop empty", {"model": "parrot-tiny", "messages": msg(), "stop": ""}, 400),
    ("stream not a bool", {"model": "parrot-tiny", "messages": msg(), "stream": "yes"}, 400),
    ("stream_options without stream", {"model": "parrot-tiny", "messages": msg(),
                                       "stream_options": {"include_usage": True}}, 400),
    ("n=2", {"model": "parrot-tiny", "messages": msg(), "n": 2}, 400),
    ("deep nesting", b"[" * 100000 + b"]" * 100000, 400),
    ("body too large", b'{"model": "parrot-tiny", "x": "' + b"a" * (33 << 20) + b'"}', 413),
]


@pytest.mark.parametrize("name, body, status", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_4xx_json_error_and_the_server_stays_up(server, name, body, status):
    if isinstance(body, dict):
        import json

        body = json.loads(json.dumps(body).replace("IMAGE", data_url(random_image(8, 8))))
    r = post(server, raw=body) if isinstance(body, bytes) else post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert {"param", "code"} <= set(err)
    assert server.health()["status"] == "ok"


def test_auth_routes_and_methods(server):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
        r = post(server, {"model": "parrot-tiny", "messages": msg()}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    r = httpx.get(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(server.url + "/nowhere")
    assert r.status_code == 404 and "error" in r.json()
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    body = {"model": "parrot-tiny", "messages": msg("Tell me everything."), "max_tokens": 4000, "stream": True}
    import json

    with httpx.stream("POST", server.url + "/v1/chat/completions", content=json.dumps(body),
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as r:
        lines = r.iter_lines()
        assert sum(1 for line in (next(lines) for _ in range(6)) if line.startswith("data:")) >= 3
    import time

    t_end = time.monotonic() + 10
    while server.health()["running"] and time.monotonic() < t_end:
        time.sleep(0.05)
    assert server.health()["running"] == 0
    assert logged(server, lambda line: "(client left)" in line)
    # and the server answers the next request
    assert post(server, {"model": "parrot-tiny", "messages": msg(), "max_tokens": 3}).status_code == 200


@pytest.fixture(scope="module")
def web(files):
    """A plain HTTP server on loopback for image URLs: the photo, a 21 MB file, a redirect to file:."""
    import http.server
    import threading

    ckpt, allowed = files
    photo = (allowed / "photo.png").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/photo.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(photo)))
                self.end_headers()
                self.wfile.write(photo)
            elif self.path == "/huge.png":  # no Content-Length: the size bound must hold while reading
                self.send_response(200)
                self.end_headers()
                for _ in range(21):
                    self.wfile.write(b"\x00" * (1 << 20))
            elif self.path == "/to-file":
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.end_headers()
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_http_image_urls_are_fetched_within_limits(server, client, local, web):
    alone = local.generate(QUESTION, server.allowed / "photo.png", max_tokens=5).text
    assert ask(client, [image_message(web + "/photo.png", QUESTION)], max_tokens=5)[0] == alone
    for path, status in [("/missing.png", 400), ("/huge.png", 413), ("/to-file", 400)]:
        r = post(server, {"model": "parrot-tiny", "messages": [image_message(web + path, "hi")]})
        assert r.status_code == status, (path, r.text)
        assert r.json()["error"]["param"] == "messages.content.image_url"


def logged(server, pred, timeout: float = 10) -> bool:
    """Whether the server logs a line for which pred holds (the log is read from its stderr as it comes)."""
    import time

    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if any(pred(line) for line in list(server.log)):
            return True
        time.sleep(0.05)
    return False


def test_every_request_is_logged_and_ctrl_c_stops_cleanly(server):
    import json
    import threading

    assert post(server, {"model": "parrot-tiny", "messages": msg(), "max_tokens": 3}).status_code == 200
    assert post(server, {"model": "parrot-tiny", "messages": msg(), "max_tokens": 0}).status_code == 400
    assert logged(server, lambda line: '"POST /v1/chat/completions" 200 prompt=' in line
                  and "completion=3 tokens" in line)
    assert logged(server, lambda line: '"POST /v1/chat/completions" 400' in line)
    lines, started = [], threading.Event()

    def long_answer():  # still streaming when Ctrl-C comes
        body = {"model": "parrot-tiny", "messages": msg("Go on."), "max_tokens": 4000, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", content=json.dumps(body),
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as r:
            for line in r.iter_lines():
                lines.append(line)
                started.set()

    reader = threading.Thread(target=long_answer)
    reader.start()
    assert started.wait(30)
    assert server.interrupt() == 0, "\n".join(server.log)
    reader.join(10)
    assert server.log[-1] == "Server stopped." and not any("Traceback" in line for line in server.log)
    events = [x for x in lines if x]
    assert events[-1] == "data: [DONE]" and "shutting_down" in events[-2]  # the client is told, not cut off
