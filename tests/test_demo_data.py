"""The demo's synthetic data: seeded, held-out split really held out, MCQ prompts exactly as `parrot eval`
builds them, and the grammar of the six languages' answers."""

from __future__ import annotations

import hashlib
import json

import pytest

from parrot.demo import phrases as P
from parrot.demo.data import HELDOUT_COMBOS, build, restrict, turn_type
from parrot.eval.data import read_dataset
from parrot.eval.prompt import INSTRUCTIONS, build_prompt
from parrot.eval.sources import resolve_sources


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    build(out, n_stage1=60, n_stage2=240, n_heldout=16, seed=3)
    return out


def _digest(d) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(demo_data, tmp_path):
    build(tmp_path / "again", n_stage1=60, n_stage2=240, n_heldout=16, seed=3)
    build(tmp_path / "other", n_stage1=60, n_stage2=240, n_heldout=16, seed=4)
    assert _digest(tmp_path / "again") == _digest(demo_data)
    assert _digest(tmp_path / "other") != _digest(demo_data)


def test_heldout_combinations_and_paraphrases_never_occur_in_training(demo_data):
    captions = [s["conversations"][1]["value"] for s in json.loads((demo_data / "stage1.json").read_text())]
    where = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
    for c, s, p in HELDOUT_COMBOS:  # read from the captions, independently of labels.json
        assert not any(x.lower().startswith((f"a {c} {s} {where[p]}", f"an {c} {s} {where[p]}")) for x in captions)
    labels = json.loads((demo_data / "labels.json").read_text())
    assert len(labels) == 60 + 240
    singles = [(v["colour"], v["shape"], v["position"]) for v in labels.values() if v["count"] == 1]
    assert len(singles) > 100 and not set(singles) & HELDOUT_COMBOS
    # every colour and every shape is trained at some position; the held-out images hold only held-out combinations
    assert {c for c, _, _ in singles} == set(P.COLOURS) and {s for _, s, _ in singles} == set(P.SHAPES)
    heldout = json.loads((demo_data / "heldout" / "heldout.json").read_text())
    for x in heldout:
        if x["category"] in ("colour", "shape", "position"):
            answer = x["conversations"][1]["value"]
            assert any(P.answer(x["lang"], x["category"], c, s, 1, p) == answer for c, s, p in HELDOUT_COMBOS)
    stage2 = json.loads((demo_data / "stage2.json").read_text())
    humans = [t["value"].removeprefix("<image>\n") for s in stage2 for t in s["conversations"] if t["from"] == "human"]
    assert len({s["conversations"][0]["value"] for s in stage2}) > 50
    for lang in P.LANGS:
        for qtype, qs in P.QUESTIONS[lang].items():
            assert not any(h.split("\n")[0] == qs[-1] for h in humans), (lang, qtype)
            assert any(h.split("\n")[0] == qs[0] for h in humans) or qtype != "count", (lang, qtype)


def test_mcq_turns_are_parrot_eval_prompts_answered_with_the_right_options_text(demo_data):
    stage2 = json.loads((demo_data / "stage2.json").read_text())
    labels = json.loads((demo_data / "labels.json").read_text())
    n = generic = 0
    for s in stage2:
        turns = s["conversations"]
        for q, a in zip(turns[::2], turns[1::2]):
            text = q["value"].removeprefix("<image>\n")
            if "\nA. " not in text:
                continue
            n += 1
            lines = text.split("\n")
            row = {"question": lines[0], **{ln[0]: ln[3:] for ln in lines[1:5]}}
            suffix = next((k for k, v in INSTRUCTIONS.items() if text.endswith(v)), "_en")
            assert build_prompt(row, f"demo{suffix}") == text
            # the answer is one option's text, and that option is what the image shows (labels.json)
            qtype = turn_type(text)
            lang = P.LANGS[int(s["id"].split("_")[1]) % len(P.LANGS)]  # sample i is asked in language i mod 6
            truth = labels[s["image"]][qtype]
            assert [row[k] for k in "ABCD"].count(a["value"]) == 1
            assert a["value"] == P.option_words(lang, qtype)[truth], (text, a["value"], truth)
            generic += lines[0] in P.CHOOSE[lang]
    assert n > 60
    assert 0.1 < generic / n < 0.4  # about a quarter name no question type: the options say it


@pytest.mark.parametrize("lang", P.LANGS)
def test_heldout_tsv_reads_as_a_vlmevalkit_dataset(demo_data, lang):
    (src,) = resolve_sources([str(demo_data / "heldout" / f"demo_{P.EVAL_SUFFIX[lang]}.tsv")])
    ds = read_dataset(src)
    assert len(ds) == 16 and not ds.problems
    assert sorted({r["category"] for r in ds.rows}) == sorted(P.QTYPES)
    assert {r["answer"] for r in ds.rows} <= set("ABCD") and len({r["answer"] for r in ds.rows}) > 1


@pytest.mark.parametrize(("lang", "qtype", "colour", "shape", "count", "position", "expected"), [
    ("ru", "count", "red", "circle", 2, None, "На картинке две фигуры."),
    ("ru", "count", "red", "circle", 4, None, "На картинке четыре фигуры."),
    ("ru", "colour", "blue", "star", 1, None, "Фигура синего цвета."),
    ("ar", "colour", "red", "circle", 1, None, "الدائرة حمراء."),
    ("ar", "colour", "red", "square", 1, None, "المربع أحمر."),
    ("ar", "count", "red", "square", 2, None, "في الصورة شكلان."),
    ("ar", "count", "red", "square", 3, None, "في الصورة ثلاثة أشكال."),
    ("pt", "colour", "yellow", "star", 1, None, "A estrela é amarela."),
    ("pt", "colour", "yellow", "square", 1, None, "O quadrado é amarelo."),
    ("pt", "shape", "red", "star", 1, None, "É uma estrela."),
    ("zh", "count", "red", "star", 2, None, "有两个图形。"),
    ("tr", "count", "red", "star", 3, None, "Resimde üç şekil var."),
    ("en", "count", "red", "star", 1, None, "There is one shape."),
    ("en", "position", "red", "star", 1, "left", "On the left."),
])
def test_answers_have_the_grammar_of_their_language(lang, qtype, colour, shape, count, position, expected):
    assert P.answer(lang, qtype, colour, shape, count, position) == expected


def test_descriptions_agree_in_gender():
    assert P.describe("ru", "white", "star") == "белая звезда"
    assert P.describe("ru", "white", "square") == "белый квадрат"
    assert P.describe("ar", "green", "star") == "نجمة خضراء"
    assert P.describe("pt", "black", "star") == "uma estrela preta"


def test_restrict_keeps_the_turns_of_the_asked_types_with_the_image_in_front(demo_data):
    stage2 = json.loads((demo_data / "stage2.json").read_text())
    pairs = [(s["id"], q["value"].removeprefix("<image>\n"), a["value"])
             for s in stage2 for q, a in zip(s["conversations"][::2], s["conversations"][1::2])]
    # the question type, read independently of turn_type: an open answer is one of the type's own answers
    for _, q, a in pairs:
        if "\nA. " not in q:
            lang = next(lg for lg in P.LANGS if any(q in qs for qs in P.QUESTIONS[lg].values()))
            kinds = {t for t in P.QTYPES for c in P.COLOURS for s in P.SHAPES for n in P.COUNTS for p in P.POSITIONS
                     if P.answer(lang, t, c, s, n, p) == a}
            assert turn_type(q) in kinds, (q, a)
    colour = restrict(stage2, ("colour",))
    kept = [(s["id"], q["value"].removeprefix("<image>\n"), a["value"])
            for s in colour for q, a in zip(s["conversations"][::2], s["conversations"][1::2])]
    assert kept == [x for x in pairs if turn_type(x[1]) == "colour"] and kept
    for s in colour:  # one image placeholder, in front of the first question; roles alternate
        values = [t["value"] for t in s["conversations"]]
        assert values[0].startswith("<image>\n") and sum(v.count("<image>") for v in values) == 1
        assert [t["from"] for t in s["conversations"]] == ["human", "gpt"] * (len(values) // 2)
    assert restrict(stage2, tuple(P.QTYPES)) == stage2
    with pytest.raises(ValueError, match="not a demo question"):
        turn_type("What is the meaning of life?")
