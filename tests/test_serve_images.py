"""Image URLs of `parrot serve` requests (parrot.serve.images), without a server: schemes, data: URLs,
local paths confined to the allowed directory (symlinks included), the switch for downloads."""

from __future__ import annotations

import base64

import pytest

from parrot.serve.images import image_bytes
from parrot.serve.protocol import APIError, Limits


def status(url, limits=Limits(), allowed=None) -> int:
    with pytest.raises(APIError) as e:
        image_bytes(url, limits, allowed)
    assert e.value.param == "messages.content.image_url" and e.value.message
    return e.value.status


def test_data_urls_decode_with_line_breaks_and_parameters():
    payload = base64.b64encode(b"\x89PNG-and-more-bytes" * 10).decode()
    wrapped = "\n".join(payload[i:i + 20] for i in range(0, len(payload), 20))
    assert image_bytes("data:image/png;base64," + wrapped, Limits(), None) == b"\x89PNG-and-more-bytes" * 10
    assert image_bytes("DATA:image/png;name=a.png;base64," + payload, Limits(), None).startswith(b"\x89PNG")
    assert status("data:image/png;base64," + "A" * 200, Limits(max_image_bytes=100)) == 413


@pytest.mark.parametrize("url", ["file:///etc/passwd", "FILE:/etc/passwd", "ftp://h/a.png", "javascript:alert(1)",
                                 "gopher://h/", "s3://bucket/a.png", "blob:http://x/1"])
def test_other_schemes_are_refused(url, tmp_path):
    assert status(url, allowed=tmp_path) == 400


def test_local_paths_stay_inside_the_allowed_directory(tmp_path):
    allowed = (tmp_path / "allowed")
    allowed.mkdir()
    (allowed / "a.png").write_bytes(b"inside")
    (tmp_path / "secret.png").write_bytes(b"outside")
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    (allowed / "sub").mkdir()
    assert image_bytes(str(allowed / "a.png"), Limits(), allowed) == b"inside"
    assert image_bytes("sub/../a.png", Limits(), allowed) == b"inside"
    assert status(str(allowed / "a.png")) == 400  # no --allowed-local-dir: no local files at all
    for url in (str(tmp_path / "secret.png"), "../secret.png", "link.png", str(allowed / "sub" / ".." / ".." /
                                                                                  "secret.png")):
        assert status(url, allowed=allowed) == 403, url
    assert status("sub", allowed=allowed) == 400  # a directory
    assert status("x" * 5000 + ".png", allowed=allowed) == 400  # a name the OS refuses
    assert status("a\x00.png", allowed=allowed) == 400


def test_downloads_can_be_switched_off():
    assert status("http://127.0.0.1:9/a.png", Limits(remote_images=False)) == 400
