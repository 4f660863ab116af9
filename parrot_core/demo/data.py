"""Seeded synthetic visual-instruction data for the demo Parrot: shapes in colours, asked about in six languages.

Images: 1-4 shapes (circle, square, triangle, star) in eight named colours on a plain background of
random colour and brightness (kept far from every shape's colour), at random sizes, positions,
image sizes and aspect ratios, saved as PNG or JPEG. Images with one shape put it clearly on the
left, right, top or bottom; images with several shapes are asked how many there are.

Outputs (`build(out_dir, ...)`):
- `stage1.json`: English captions (LLaVA-558k style, one "describe" turn);
- `stage2.json`: instructions in en, zh, pt, ar, tr, ru, 2-6 turns per image, open questions with short
  answers and multiple-choice questions in exactly the prompt `parrot eval` builds (answer: the right option's
  text, which `parrot eval` maps to its letter as VLMEvalKit does; a quarter of them asked with a question
  that names no type, so the options must be read);
- `heldout/demo_{en,cn,pt,ar,tr,ru}.tsv`: VLMEvalKit MCQ TSVs (base64 images) of new images, asked with
  paraphrases that never occur in training; their one-shape images hold (colour, shape, position)
  combinations that no training image holds (every colour/shape pair and every position is trained,
  only these combinations are new); `heldout/heldout.json` the same questions open-ended in LLaVA JSON
  (for chat checks and `parrot inspect routing`);
- `labels.json`: image name -> {colour, shape, position, count} of the training images (what the recipe's
  tower pre-training learns to see);
- `images/`: the images the JSON files name.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..eval.prompt import OPTION_LETTERS, build_prompt
from . import phrases as P

# (colour, shape, position) combinations of one-shape images that no training image holds: each colour twice,
# each shape and each position four times; every (colour, shape) pair still occurs in training at other positions
HELDOUT_COMBOS = frozenset((P.COLOURS[i % 8], P.SHAPES[(i + i // 8) % 4], P.POSITIONS[(i // 2 + i) % 4])
                           for i in range(16))
CAPTION_PROMPTS = ["Describe the image briefly.", "What is in the image?", "Give a short caption of the picture.",
                   "Summarize the picture in a sentence.", "Write a brief description of the image."]
NAMES = ["one", "two", "three", "four"]


@dataclass
class Shape:
    colour: str
    shape: str
    cx: float  # centre, pixels
    cy: float
    r: float  # half the size, pixels


@dataclass
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: list[Shape]
    position: str | None  # left/right/top/bottom for one-shape scenes

    @property
    def main(self) -> Shape:
        return self.shapes[0]


def _far_background(rng: random.Random, colours: list[str]) -> tuple[int, int, int]:
    for _ in range(1000):
        level = rng.randint(0, 255)
        bg = tuple(max(0, min(255, level + rng.randint(-50, 50))) for _ in range(3))
        if all(math.dist(bg, P.RGB[c]) > 110 for c in colours):
            return bg
    return (128, 128, 128)


def _one(rng: random.Random, heldout: bool) -> tuple[str, str, str]:
    """(colour, shape, position) of a one-shape image: a held-out combination or one that is not."""
    if heldout:
        return rng.choice(sorted(HELDOUT_COMBOS))
    while True:
        combo = rng.choice(P.COLOURS), rng.choice(P.SHAPES), rng.choice(P.POSITIONS)
        if combo not in HELDOUT_COMBOS:
            return combo


def random_scene(rng: random.Random, count: int, heldout: bool = False) -> Scene:
    aspect = math.exp(rng.uniform(math.log(0.75), math.log(1.33)))
    area = math.exp(rng.uniform(math.log(48), math.log(256))) ** 2
    w, h = max(32, round(math.sqrt(area * aspect))), max(32, round(math.sqrt(area / aspect)))
    side = min(w, h)
    if count == 1:
        c, s, position = _one(rng, heldout)
        r = rng.uniform(0.15, 0.28) * side
        along = rng.uniform(0.35, 0.65)  # the coordinate that does not decide the position
        off = rng.uniform(0.03, 0.12)  # distance of the shape's edge from the image edge, as a fraction
        if position in ("left", "right"):
            near = min(r + off * w, 0.36 * w)  # the centre stays in the outer 36%: clearly on that side
            cx = near if position == "left" else w - near
            cy = along * h
        else:
            near = min(r + off * h, 0.36 * h)
            cy = near if position == "top" else h - near
            cx = along * w
        shapes = [Shape(c, s, cx, cy, r)]
    else:
        position = None
        shapes = []
        while len(shapes) < count:
            r = rng.uniform(0.1, 0.17) * side
            cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
            if all(math.dist((cx, cy), (o.cx, o.cy)) > r + o.r + 3 for o in shapes):
                c, s = rng.choice(P.COLOURS), rng.choice(P.SHAPES)
                shapes.append(Shape(c, s, cx, cy, r))
    bg = _far_background(rng, [x.colour for x in shapes])
    return Scene(w, h, bg, shapes, position)


def _star(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        a = angle + i * math.pi / 5
        pts.append((cx + rad * math.sin(a), cy - rad * math.cos(a)))
    return pts


def render(scene: Scene, rng: random.Random) -> Image.Image:
    scale = max(2, round(512 / max(scene.width, scene.height)))  # draw large, then downsample: smooth edges
    img = Image.new("RGB", (scene.width * scale, scene.height * scale), scene.background)
    d = ImageDraw.Draw(img)
    for sh in scene.shapes:
        cx, cy, r = sh.cx * scale, sh.cy * scale, sh.r * scale
        fill = tuple(max(0, min(255, v + rng.randint(-12, 12))) for v in P.RGB[sh.colour])
        if sh.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif sh.shape == "square":
            d.rectangle([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=fill)
        elif sh.shape == "triangle":
            d.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.75), (cx + r * 0.95, cy + r * 0.75)], fill=fill)
        else:
            d.polygon(_star(cx, cy, r, rng.uniform(-0.2, 0.2)), fill=fill)
    return img.resize((scene.width, scene.height), Image.LANCZOS)


def save_image(img: Image.Image, rng: random.Random) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if rng.random() < 0.5:
        img.save(buf, format="PNG")
        return buf.getvalue(), "png"
    img.save(buf, format="JPEG", quality=rng.randint(70, 95))
    return buf.getvalue(), "jpg"


def caption(scene: Scene) -> str:
    if len(scene.shapes) == 1:
        sh = scene.main
        where = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
        return f"{P.describe('en', sh.colour, sh.shape).capitalize()} {where[scene.position]} of the image."
    parts = [P.describe("en", s.colour, s.shape) for s in scene.shapes]
    return f"{NAMES[len(parts) - 1].capitalize()} shapes: {', '.join(parts[:-1])} and {parts[-1]}."


def qtypes_of(scene: Scene) -> list[str]:
    return list(P.QTYPES) if len(scene.shapes) == 1 else ["count"]


def truth(scene: Scene, qtype: str):
    return {"colour": scene.main.colour, "shape": scene.main.shape, "count": len(scene.shapes),
            "position": scene.position}[qtype]


def mcq_row(rng: random.Random, scene: Scene, lang: str, qtype: str, question: str) -> dict:
    """A VLMEvalKit row (without index and image): four options, one right."""
    words = P.option_words(lang, qtype)
    right = truth(scene, qtype)
    others = [v for v in words if v != right]
    values = [right, *rng.sample(others, 3)]
    rng.shuffle(values)
    row = {"question": question, **{OPTION_LETTERS[i]: words[v] for i, v in enumerate(values)}}
    row["answer"] = OPTION_LETTERS[values.index(right)]
    row["category"] = qtype
    return row


def eval_name(lang: str) -> str:
    return f"demo_{P.EVAL_SUFFIX[lang]}"


def open_answer(scene: Scene, lang: str, qtype: str) -> str:
    sh = scene.main
    return P.answer(lang, qtype, sh.colour, sh.shape, len(scene.shapes), scene.position)


# share of the training multiple-choice turns asked with a question that names no type (P.CHOOSE)
CHOOSE_SHARE = 0.25


def _turn(rng: random.Random, scene: Scene, lang: str, qtype: str, heldout: bool, mcq: bool) -> tuple[str, str]:
    """(question, answer) of one turn. A multiple-choice turn is answered with the right option's text, not its
    letter: the tiny LLM does not learn to look the letter up (docs/demo.md, fifth and sixth passes); `parrot
    eval` maps the text to its option as VLMEvalKit's matcher does."""
    qs = P.QUESTIONS[lang][qtype]
    question = qs[-1] if heldout else rng.choice(qs[:-1])
    if mcq:
        if not heldout and rng.random() < CHOOSE_SHARE:
            question = rng.choice(P.CHOOSE[lang])
        row = mcq_row(rng, scene, lang, qtype, question)
        return build_prompt(row, eval_name(lang)), row[row["answer"]]
    return question, open_answer(scene, lang, qtype)


def _scene_count(rng: random.Random) -> int:
    return 1 if rng.random() < 0.6 else rng.choice([2, 3, 4])


def scene_labels(scene: Scene) -> dict:
    """What a question can ask about an image: colour, shape and position of a one-shape image (else None), count."""
    one = len(scene.shapes) == 1
    return {"colour": scene.main.colour if one else None, "shape": scene.main.shape if one else None,
            "position": scene.position, "count": len(scene.shapes)}


def build(out: str | Path, n_stage1: int = 2000, n_stage2: int = 8000, n_heldout: int = 240, seed: int = 0,
          max_turns: int = 6) -> dict:
    """Writes the demo data into `out` (see the module doc); returns counts. Deterministic for a seed."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(exist_ok=True)
    rng = random.Random(seed)

    def new_image(tag: str, i: int, count: int, heldout: bool = False) -> tuple[Scene, str, bytes]:
        scene = random_scene(rng, count, heldout)
        data, ext = save_image(render(scene, rng), rng)
        name = f"{tag}_{i:05d}.{ext}"
        (out / "images" / name).write_bytes(data)
        return scene, name, data

    labels: dict[str, dict] = {}
    stage1 = []
    for i in range(n_stage1):
        scene, name, _ = new_image("s1", i, _scene_count(rng))
        labels[name] = scene_labels(scene)
        stage1.append({"id": f"s1_{i}", "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{rng.choice(CAPTION_PROMPTS)}"},
            {"from": "gpt", "value": caption(scene)}]})

    stage2 = []
    for i in range(n_stage2):
        scene, name, _ = new_image("s2", i, _scene_count(rng))
        labels[name] = scene_labels(scene)
        lang = P.LANGS[i % len(P.LANGS)]
        # several questions about each image (as LLaVA's instruction data): each question type at most once open
        # and once as a multiple choice, in random order
        forms = [(qtype, mcq) for qtype in qtypes_of(scene) for mcq in (False, True)]
        forms = rng.sample(forms, rng.randint(min(2, len(forms)), min(max_turns, len(forms))))
        convs = []
        for t, (qtype, mcq) in enumerate(forms):
            q, a = _turn(rng, scene, lang, qtype, False, mcq)
            convs += [{"from": "human", "value": f"<image>\n{q}" if t == 0 else q}, {"from": "gpt", "value": a}]
        stage2.append({"id": f"s2_{i}", "image": name, "conversations": convs})

    random.Random(seed + 1).shuffle(stage2)

    tables: dict[str, list[dict]] = {lang: [] for lang in P.LANGS}
    heldout_json = []
    for i in range(n_heldout):
        qtype = P.QTYPES[i % len(P.QTYPES)]
        count = rng.choice([2, 3, 4, 1]) if qtype == "count" else 1
        scene, name, data = new_image("ho", i, count, heldout=True)
        b64 = base64.b64encode(data).decode()
        for lang in P.LANGS:
            question = P.QUESTIONS[lang][qtype][-1]
            row = mcq_row(rng, scene, lang, qtype, question)
            tables[lang].append({"index": i, **row, "image": b64})
            heldout_json.append({"id": f"ho_{i}_{lang}", "image": name, "lang": lang, "category": qtype,
                                 "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                   {"from": "gpt", "value": open_answer(scene, lang, qtype)}]})
    import pandas as pd

    for lang, rows in tables.items():
        cols = ["index", "question", "A", "B", "C", "D", "answer", "category", "image"]
        pd.DataFrame(rows, columns=cols).to_csv(out / "heldout" / f"{eval_name(lang)}.tsv", sep="\t", index=False)
    for fname, obj in (("stage1.json", stage1), ("stage2.json", stage2), ("heldout/heldout.json", heldout_json),
                       ("labels.json", labels)):
        (out / fname).write_text(json.dumps(obj, ensure_ascii=False, indent=0), encoding="utf-8")
    return {"stage1": len(stage1), "stage2": len(stage2), "heldout_per_language": n_heldout}


def turn_type(question: str) -> str:
    """The question type (colour, shape, count, position) of a human turn, open or multiple choice."""
    lines = question.replace("<image>", "").strip().split("\n")
    for lang in P.LANGS:
        for qtype in P.QTYPES:
            if lines[0] in P.QUESTIONS[lang][qtype]:
                return qtype
            if lines[0] in P.CHOOSE[lang] and len(lines) > 1 and lines[1][3:] in P.option_words(lang, qtype).values():
                return qtype  # a question that names no type: option A's word says it
    raise ValueError(f"not a demo question: {lines[0]!r}")


def restrict(samples: list[dict], qtypes: tuple[str, ...]) -> list[dict]:
    """The samples' turns about `qtypes` only (samples left with none are dropped); the image placeholder stays in
    front of each sample's first question. The recipe's stage-2 curriculum trains on these in turn."""
    kept = []
    for sample in samples:
        c = sample["conversations"]
        turns = [(c[i], c[i + 1]) for i in range(0, len(c) - 1, 2) if turn_type(c[i]["value"]) in qtypes]
        convs = []
        for j, (human, gpt) in enumerate(turns):
            text = human["value"].replace("<image>", "").strip()
            convs += [{"from": "human", "value": f"<image>\n{text}" if j == 0 else text}, dict(gpt)]
        if convs:
            kept.append({**sample, "conversations": convs})
    return kept


def corpus(out: str | Path) -> list[str]:
    """Every text of the training data (the tokenizer is trained on it; held-out paraphrases are not in it)."""
    out = Path(out)
    texts = []
    for fname in ("stage1.json", "stage2.json"):
        for s in json.loads((out / fname).read_text(encoding="utf-8")):
            texts += [t["value"].replace("<image>", "") for t in s["conversations"]]
    return texts
