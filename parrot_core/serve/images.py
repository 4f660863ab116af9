"""An image URL of a request -> its encoded bytes, within limits.

`data:` URLs (base64), http(s) URLs (size and time bounded; only http and https handlers, so a
redirect cannot reach a file: or ftp: URL), and local paths only when the server was started with
`--allowed-local-dir` and the path (symlinks resolved) lies inside it. `file:` and every other scheme
are refused. Decoding and the decompression-bomb limit are `parrot chat`'s (parrot.model.image)."""

from __future__ import annotations

import base64
import binascii
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from .protocol import APIError, Limits, bad

_DATA = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
PARAM = "messages.content.image_url"


def image_bytes(url: str, limits: Limits, allowed_dir: Path | None) -> bytes:
    """The encoded image behind `url`; APIError(400) saying what is wrong."""
    m = _DATA.match(url)
    if m:
        return _data_url(url[m.end():], m, limits)
    lower = url[:8].lower()
    if lower.startswith(("http://", "https://")):
        if not limits.remote_images:
            raise bad("this server does not download images (--no-remote-images): send a data: URL (base64)", PARAM)
        return _download(url, limits)
    if _SCHEME.match(url) and not re.match(r"^[a-zA-Z]:[\\/]", url):  # a scheme, not a Windows drive
        scheme = url.split(":", 1)[0]
        raise bad(f"image URL scheme {scheme!r} is not supported: send a data: URL (base64), an http(s) URL, "
                  "or a local path under the server's --allowed-local-dir", PARAM)
    return _local(url, limits, allowed_dir)


def _data_url(payload: str, m: re.Match, limits: Limits) -> bytes:
    if not m.group("b64"):
        raise bad("data: image URLs must be base64 (data:image/png;base64,...)", PARAM)
    if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
        raise APIError(413, f"image too large (over {limits.max_image_bytes:,} bytes)", PARAM)
    try:
        return base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError):
        raise bad("the data: URL's payload is not valid base64", PARAM) from None


class _NoRedirectToOtherSchemes(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.OpenerDirector()
for _h in (urllib.request.HTTPHandler, urllib.request.HTTPSHandler, urllib.request.HTTPDefaultErrorHandler,
           urllib.request.HTTPErrorProcessor, _NoRedirectToOtherSchemes):
    _OPENER.add_handler(_h())


def _download(url: str, limits: Limits) -> bytes:
    deadline = time.monotonic() + limits.fetch_timeout
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "parrot-serve"})
        with _OPENER.open(req, timeout=limits.fetch_timeout) as r:
            size = r.headers.get("Content-Length")
            if size is not None and size.isdigit() and int(size) > limits.max_image_bytes:
                raise APIError(413, f"image at {url} too large ({int(size):,} bytes; at most "
                                    f"{limits.max_image_bytes:,})", PARAM)
            chunks, total = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise bad(f"image at {url}: download took over {limits.fetch_timeout:g} s", PARAM)
                chunk = r.read(65536)
                if not chunk:
                    break
                total += len(chunk)
                if total > limits.max_image_bytes:
                    raise APIError(413, f"image at {url} too large (over {limits.max_image_bytes:,} bytes)", PARAM)
                chunks.append(chunk)
            return b"".join(chunks)
    except APIError:
        raise
    except urllib.error.HTTPError as e:
        raise bad(f"image at {url}: the server answered HTTP {e.code}", PARAM) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise bad(f"image at {url} could not be downloaded ({reason})", PARAM) from None


def _local(url: str, limits: Limits, allowed_dir: Path | None) -> bytes:
    try:
        return _read_local(url, limits, allowed_dir)
    except OSError as e:
        raise bad(f"image {url!r} cannot be read ({e.strerror or e})", PARAM) from None


def _read_local(url: str, limits: Limits, allowed_dir: Path | None) -> bytes:
    if allowed_dir is None:
        raise bad("local image paths are refused: send a data: URL (base64) or an http(s) URL, or start the "
                  "server with --allowed-local-dir DIR", PARAM)
    try:
        path = Path(url).expanduser()
        path = (path if path.is_absolute() else allowed_dir / path).resolve()
    except (OSError, ValueError, RuntimeError):
        raise bad(f"bad image path {url!r}", PARAM) from None
    if not path.is_relative_to(allowed_dir):
        raise APIError(403, f"image path {url!r} is outside the allowed directory", PARAM)
    if not path.is_file():
        raise bad(f"image {url!r} not found under the allowed directory", PARAM)
    if path.stat().st_size > limits.max_image_bytes:
        raise APIError(413, f"image {url!r} too large (over {limits.max_image_bytes:,} bytes)", PARAM)
    return path.read_bytes()
