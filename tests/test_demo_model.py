"""The demo Parrot shipped in the package: `--model demo` resolves offline, both backends load it and compute
the same logits, and it answers held-out questions (paraphrases absent from training) about the bundled images
(colour/shape/position combinations absent from training) correctly in the six languages."""

from __future__ import annotations

import numpy as np
import pytest

import parrot
from conftest import BACKENDS, requires_mlx, requires_torch, run_parrot_here
from parrot.demo import phrases as P
from parrot.demo.showcase import IMAGE_DIR, bundled_images
from parrot.storage.hub import demo_model_dir, resolve_model_path

# (image, language, question type, words the answer must contain)
CASES = [
    ("red_circle_left", "ru", "colour", "красного"),
    ("red_circle_left", "en", "shape", "circle"),
    ("blue_triangle_bottom", "zh", "shape", "三角形"),
    ("blue_triangle_bottom", "ar", "position", "الأسفل"),
    ("orange_square_top", "pt", "position", "em cima"),
    ("orange_square_top", "tr", "colour", "turuncu"),
    ("black_star_right", "ar", "colour", "سوداء"),
    ("black_star_right", "ru", "position", "справа"),
    ("three_shapes", "tr", "count", "üç"),
    ("two_shapes", "en", "count", "two"),
    ("two_shapes", "zh", "count", "两"),
    ("three_shapes", "pt", "count", "três"),
]


@pytest.fixture(scope="module", params=BACKENDS)
def demo(request):
    return parrot.load("demo", backend=request.param, dtype="float32")


def test_demo_resolves_to_the_bundled_model_unless_a_local_directory_is_called_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("demo") == demo_model_dir()
    assert (demo_model_dir() / "model.safetensors").stat().st_size < 25 * 1024**2
    (tmp_path / "demo").mkdir()  # a folder that is no model does not hide the bundled one
    assert resolve_model_path("demo") == demo_model_dir()
    (tmp_path / "demo" / "config.json").write_text("{}")
    assert resolve_model_path("demo").resolve() == (tmp_path / "demo").resolve()


@requires_torch
@requires_mlx
def test_demo_logits_match_across_backends():
    image = IMAGE_DIR / "red_circle_left.png"
    question = P.QUESTIONS["ar"]["colour"][-1]
    out = []
    for backend in ("cpu", "mlx"):
        m = parrot.load("demo", backend=backend, dtype="float32")
        ids = m.encode_prompt(question, has_image=True)
        out.append(m.logits(ids, m.preprocess(image)))  # [T, V], visual tokens included
    a, b = (np.asarray(x, np.float64) for x in out)
    assert a.shape == b.shape and a.shape[-1] >= 1000
    np.testing.assert_allclose(a, b, atol=2e-3, rtol=0)
    assert np.array_equal(a.argmax(-1), b.argmax(-1))


# what the bundled images show (their names say it; none of these colour/shape/position combinations is trained)
TRUTH = {"red_circle_left": ("red", "circle", 1, "left"), "blue_triangle_bottom": ("blue", "triangle", 1, "bottom"),
         "orange_square_top": ("orange", "square", 1, "top"), "black_star_right": ("black", "star", 1, "right"),
         "two_shapes": (None, None, 2, None), "three_shapes": (None, None, 3, None)}


def test_demo_names_colour_shape_count_and_position_of_images_it_never_saw(demo):
    """Asked as in training (a trained paraphrase), in every language: the exact answer, grammar included, as
    parrot.demo.phrases writes it. Chance: 1 in 8 colours, 1 in 4 shapes, counts and positions. The shipped demo
    gets 21/24 colours, 18/24 shapes, 24/36 counts, 24/24 positions (docs/demo.md)."""
    right: dict[str, int] = {"colour": 0, "shape": 0, "count": 0, "position": 0}
    per_lang = dict.fromkeys(P.LANGS, 0)
    for image, (colour, shape, count, position) in TRUTH.items():
        for lang in P.LANGS:
            for qtype in ("colour", "shape", "count", "position") if count == 1 else ("count",):
                answer = demo.generate(P.QUESTIONS[lang][qtype][0], IMAGE_DIR / f"{image}.png", max_tokens=24).text
                ok = answer.strip() == P.answer(lang, qtype, colour, shape, count, position)
                right[qtype] += ok
                per_lang[lang] += ok
    assert right["colour"] >= 18 and right["shape"] >= 15 and right["count"] >= 20 and right["position"] >= 20, right
    assert min(per_lang.values()) >= 12, per_lang  # of 18 per language


@pytest.mark.xfail(strict=True, reason="asked an open question with a held-out paraphrase the shipped demo often "
                   "mistakes the question type (shape questions answered with a position; docs/demo.md, 'Sixth "
                   "pass'); remove this mark when a model that does not is shipped")
def test_demo_answers_heldout_questions(demo):
    wrong = []  # one test over every case: a model at chance gets a few right by luck
    for image, lang, qtype, expected in CASES:
        question = P.QUESTIONS[lang][qtype][-1]  # the held-out paraphrase
        answer = demo.generate(question, IMAGE_DIR / f"{image}.png", max_tokens=24).text
        if expected.lower() not in answer.lower():
            wrong.append((image, question, answer))
    assert not wrong, wrong


def test_parrot_demo_shows_every_bundled_image_and_six_languages():
    proc = run_parrot_here("demo", "--backend", "cpu")
    assert proc.returncode == 0, proc.stderr
    for p in bundled_images():
        assert p.name in proc.stdout
    for lang in P.LANGS:
        assert f"  {lang}  " in proc.stdout
    assert "红色" in proc.stdout or "星形" in proc.stdout or "圆形" in proc.stdout


def test_parrot_demo_asks_about_ones_own_image_and_refuses_a_missing_one(tmp_path):
    from PIL import Image

    Image.open(IMAGE_DIR / "orange_square_top.png").save(tmp_path / "mine.jpg")
    proc = run_parrot_here("demo", "--backend", "cpu", "--image", str(tmp_path / "mine.jpg"))
    assert proc.returncode == 0, proc.stderr
    assert "mine.jpg" in proc.stdout and "red_circle_left.png" not in proc.stdout
    bad = run_parrot_here("demo", "--backend", "cpu", "--image", str(tmp_path / "nope.png"))
    assert bad.returncode != 0 and "nope.png" in bad.stdout + bad.stderr


@requires_torch
@requires_mlx
def test_parrot_demo_gives_the_same_answers_on_both_backends():
    import re

    outs = []
    for backend in ("cpu", "mlx"):
        proc = run_parrot_here("demo", "--backend", backend)
        assert proc.returncode == 0, proc.stderr
        outs.append([re.sub(r"\s+\d+ ms$", "", line) for line in proc.stdout.splitlines()[1:]])
    assert outs[0] == outs[1] and len(outs[0]) > 30


def _bundled_mcq_tsv(path) -> list[str]:
    """A VLMEvalKit TSV of four-option questions about the bundled images, six languages, asked with the held-out
    paraphrase; the right letter comes from the image's name (TRUTH), the distractors are the next values in the
    word list. Returns the dataset names (one TSV per language, named as parrot eval picks the instruction)."""
    import base64

    import pandas as pd

    names = []
    for lang in P.LANGS:
        rows = []
        for image, (colour, shape, count, position) in TRUTH.items():
            b64 = base64.b64encode((IMAGE_DIR / f"{image}.png").read_bytes()).decode()
            asked = {"colour": colour, "shape": shape, "count": count, "position": position}
            for qtype in ("colour", "shape", "count", "position") if count == 1 else ("count",):
                words = P.option_words(lang, qtype)
                values = list(words)
                k = values.index(asked[qtype])
                options = [values[(k + j) % len(values)] for j in range(4)]
                right = (len(rows) + len(lang)) % 4  # where the right option goes: varies with the row
                options[0], options[right] = options[right], options[0]
                rows.append({"index": len(rows), "question": P.QUESTIONS[lang][qtype][-1],
                             **{L: words[v] for L, v in zip("ABCD", options)}, "answer": "ABCD"[right],
                             "category": qtype, "image": b64})
        name = f"bundled_{P.EVAL_SUFFIX[lang]}"
        pd.DataFrame(rows).to_csv(path / f"{name}.tsv", sep="\t", index=False)
        names.append(name)
    return names


MCQ_MIN_PER_LANGUAGE = 0.7  # the shipped demo: 15 of 18 in every language (docs/demo.md)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parrot_eval_of_the_demo_on_the_bundled_images_is_well_above_chance(tmp_path, backend):
    """`parrot eval --model demo` on multiple-choice questions about the bundled images (held-out paraphrases,
    combinations absent from training): the demo answers with the option's text, which the VLMEvalKit matcher maps
    to its letter. Chance: 25%."""
    import json

    names = _bundled_mcq_tsv(tmp_path)
    proc = run_parrot_here("eval", *[tmp_path / f"{n}.tsv" for n in names], "--model", "demo", "--backend", backend,
                           "--output", tmp_path / "out", "--batch-size", "8", "--max-tokens", "8", "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["datasets"]
    acc = {n: summary[n]["overall"] for n in names}
    cats = {c: np.mean([summary[n]["categories"][c] for n in names]) for c in ("colour", "shape", "count")}
    assert min(acc.values()) >= MCQ_MIN_PER_LANGUAGE, acc  # of 18 questions per language
    assert cats["colour"] >= 0.9 and cats["count"] >= 0.6 and cats["shape"] >= 0.6, cats
