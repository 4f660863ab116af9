"""The chat page of `parrot serve` in a real headless browser (Debian's Chromium driven by Playwright):
upload an image, ask, see the streamed answer appear, ask a follow-up. Skipped, with the reason, only
when no browser is installed (`make install` installs Debian's chromium where it can)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import parrot
from conftest import random_image, requires_torch
from serve_helpers import API_KEY, Server, never_stopping_checkpoint

CHROMIUM = next((p for p in (os.environ.get("PARROT_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                             shutil.which("chromium-browser")) if p and Path(p).exists()), None)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = [requires_torch,
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")]


@pytest.mark.slow  # a real SIGKILL / browser end to end: make test runs it, make test-quick skips it
def test_upload_ask_and_watch_the_answer_stream(tmp_path):
    ckpt = never_stopping_checkpoint(tmp_path / "parrot-tiny")
    photo = tmp_path / "photo.png"
    random_image(64, 48, seed=11).save(photo)
    local = parrot.load(ckpt, backend="cpu")
    first = local.chat(photo)
    expected = [first.ask("What is in this picture?", max_tokens=40).consume().text,
                first.ask("Answer in Turkish, please.", max_tokens=40).consume().text]
    server = Server(ckpt, "cpu", "--max-tokens", "40", "--api-key", API_KEY)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 640})
            page.goto(server.url + "/")
            page.fill("#api-key", API_KEY)
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.getElementById('model').textContent === 'parrot-tiny'", timeout=10000)
            page.set_input_files("#image-input", str(photo))
            page.wait_for_function("document.getElementById('status').textContent === 'image ready'", timeout=10000)
            for n, question in enumerate(["What is in this picture?", "Answer in Turkish, please."], 1):
                page.fill("#question", question)
                page.click("#send")
                page.wait_for_selector(f".msg.assistant:nth-of-type({2 * n})[data-state=done]", timeout=30000)
            answers = page.locator(".msg.assistant").all_inner_texts()
            assert [a.strip() for a in answers] == [e.strip() for e in expected]
            assert page.locator(".msg.user img").count() == 1  # the image, shown in the first turn
            assert page.locator(".msg.error").count() == 0
            assert page.inner_text("#status") == "40 tokens"  # usage of the streamed answer
            shot = Path(os.environ.get("PARROT_SERVE_SCREENSHOT") or tmp_path / "serve.png")
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 1000
            browser.close()
    finally:
        server.interrupt()
    assert sum('"POST /v1/chat/completions" 200' in line for line in server.log) == 2
