"""`parrot chat` end to end (subprocess: real exit codes, stdin, stdout) and every bad input's message."""

from __future__ import annotations

import io

import pytest
from PIL import Image

import parrot
from conftest import (
    BACKENDS,
    HAS_TORCH,
    assert_clean_failure,
    random_image,
    requires_mlx,
    requires_torch,
    run_parrot,
    run_parrot_here,
    without_packages,
)
from parrot.cli.repl import printable
from parrot.errors import ParrotError

Q1, Q2, Q3 = "What is in the picture?", "Describe the image in detail.", "这张图片里有什么？"

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    random_image(41, 27, seed=3).save(d / "a.png")
    random_image(30, 44, seed=4).save(d / "b.jpg")
    return d / "a.png", d / "b.jpg"


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("this is not an image\n")
    buf = io.BytesIO()
    random_image(64, 64, seed=1).save(buf, format="PNG")
    (d / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 3 // 5])
    Image.new("1", (10000, 9000)).save(d / "bomb.png")  # 9e7 pixels in an 11 KB file
    return {"missing": d / "missing.png", "text": d / "notes.txt", "truncated": d / "cut.png", "bomb": d / "bomb.png"}


BAD_IMAGE_MESSAGES = {"missing": "image not found", "text": "not an image", "truncated": "truncated",
                      "bomb": "decompression bomb"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_chat_prompt_answers_once_on_stdout(backend, tiny_ckpt, images):
    proc = run_parrot("chat", "--backend", backend, "--model", tiny_ckpt, images[0], "--prompt", Q1,
                      "--max-tokens", "10", "-v")
    assert proc.returncode == 0, proc.stderr
    want = parrot.load(tiny_ckpt, backend=backend).generate(Q1, images[0], max_tokens=10).text
    assert proc.stdout == printable(want) + "\n"  # the API's text, control characters shown as escapes
    assert "Generation: 10 tokens" in proc.stderr and "Peak memory" in proc.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_chat_interactive_session_through_stdin(backend, tiny_ckpt, images):
    script = f"{Q1}\n{Q2}\n/image {images[1]}\n{Q1}\n/clear\n{Q3}\n/exit\n{Q2}\n"
    proc = run_parrot("chat", "--backend", backend, "--model", tiny_ckpt, images[0], "--max-tokens", "8",
                      input=script)
    assert proc.returncode == 0, proc.stderr
    m = parrot.load(tiny_ckpt, backend=backend)
    a1 = m.generate(Q1, images[0], max_tokens=8).text
    a2 = m.generate(Q2, images[0], max_tokens=8, history=[(Q1, a1.strip())]).text
    a3 = m.generate(Q1, images[1], max_tokens=8).text  # /image starts a new conversation
    a4 = m.generate(Q3, images[1], max_tokens=8).text  # /clear forgets it
    a1, a2, a3, a4 = map(printable, (a1, a2, a3, a4))  # as shown on the terminal
    assert proc.stdout == f">> {a1}\n>> {a2}\n>> >> {a3}\n>> >> {a4}\n>> "
    assert "(new conversation)" in proc.stderr and "Conversation cleared" in proc.stderr


@requires_mlx
def test_chat_text_only_session_ends_at_end_of_input(tiny_ckpt):
    proc = run_parrot("chat", "--backend", "mlx", "--model", tiny_ckpt, "--max-tokens", "5", input=f"{Q1}\n")
    assert proc.returncode == 0, proc.stderr
    want = parrot.load(tiny_ckpt, backend="mlx").generate(Q1, None, max_tokens=5).text
    assert proc.stdout == f">> {want}\n>> \n"
    assert "text only" in proc.stderr


@pytest.mark.parametrize("kind", sorted(BAD_IMAGE_MESSAGES))
def test_chat_refuses_bad_images_cleanly(kind, tiny_ckpt, bad_images):
    proc = run_parrot("chat", "--backend", "cpu", "--model", tiny_ckpt, bad_images[kind], "--prompt", "hi")
    assert_clean_failure(proc, str(bad_images[kind].name), BAD_IMAGE_MESSAGES[kind])


@pytest.mark.parametrize("kind", sorted(BAD_IMAGE_MESSAGES))
def test_generate_and_sessions_refuse_bad_images(kind, tiny_ckpt, bad_images):
    backend = "cpu" if HAS_TORCH else "mlx"
    m = parrot.load(tiny_ckpt, backend=backend)
    with pytest.raises(ParrotError, match=BAD_IMAGE_MESSAGES[kind]):
        m.generate("hi", bad_images[kind], max_tokens=2)
    with pytest.raises(ParrotError, match=BAD_IMAGE_MESSAGES[kind]):
        m.stream("hi", bad_images[kind], max_tokens=2)  # at the call, before any iteration
    s = m.chat(None)
    with pytest.raises(ParrotError, match=BAD_IMAGE_MESSAGES[kind]):
        s.set_image(bad_images[kind])
    assert s.pixels is None  # a refused image changes nothing


def test_chat_mlx_backend_without_mlx_installed(tiny_ckpt, images):
    proc = run_parrot("chat", "--backend", "mlx", "--model", tiny_ckpt, images[0], "--prompt", "hi",
                      env=without_packages("mlx"))
    assert_clean_failure(proc, "--backend mlx needs MLX, which is not installed", "pip install")


@requires_torch
def test_chat_cuda_backend_without_a_gpu(tiny_ckpt, images):
    proc = run_parrot("chat", "--backend", "cuda", "--model", tiny_ckpt, images[0], "--prompt", "hi",
                      env={"CUDA_VISIBLE_DEVICES": ""})
    assert_clean_failure(proc, "no CUDA GPU")


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d: d / "nowhere", "model directory not found"),
        (lambda d: d, "config.json"),
        (lambda d: (d / "config.json").write_text("{not json") and d, "config.json"),
    ],
    ids=["missing", "empty-dir", "bad-config"],
)
def test_chat_invalid_model_directory(make, needle, tmp_path, images):
    model_dir = make(tmp_path)
    backend = "cpu" if HAS_TORCH else "mlx"
    proc = run_parrot_here("chat", "--backend", backend, "--model", model_dir, images[0], "--prompt", "hi")
    assert_clean_failure(proc, needle)


@pytest.mark.parametrize(
    "args, needle",
    [(["--temp", "-1"], "--temp must be a finite number >= 0"), (["--top-p", "0"], "--top-p must be in (0, 1]"),
     (["--max-tokens", "0"], "--max-tokens must be an integer >= 1"), (["--seed", "-2"], "--seed must be")],
)
def test_chat_bad_sampling_options_name_the_flag(args, needle, tiny_ckpt):
    proc = run_parrot("chat", "--backend", "cpu", "--model", tiny_ckpt, "--prompt", "hi", *args)
    assert_clean_failure(proc, needle)
    assert "max_tokens" not in proc.stderr and "top_p" not in proc.stderr  # no Python parameter names
