"""Tiny LLaVA datasets and run helpers for the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

QUESTIONS = [
    "What is in the picture?", "Describe the image in detail.", "O que há na imagem?", "Resimde ne var?",
    "这张图片里有什么？", "Что изображено на картинке?",
]
ANSWERS = [
    "There is a red apple on a wooden table next to a cup of tea.", "A cat sitting on the window.",
    "Há um gato sentado no parapeito da janela.", "Pencere kenarında oturan bir kedi var.",
    "图片里有一只猫坐在窗台上。", "На картинке кошка сидит на подоконнике.",
]


def write_images(image_dir: Path, n: int, seed: int = 0) -> list[str]:
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        h, w = 17 + 5 * i, 40 - 3 * i  # non-square: padding to square matters
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(image_dir / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


def mixed_samples(images: list[str], n: int) -> list[dict]:
    """n samples: image single-turn, text-only, image multi-turn, in rotation, of varying lengths."""
    out = []
    for i in range(n):
        q, a = QUESTIONS[i % len(QUESTIONS)], ANSWERS[i % len(ANSWERS)]
        kind = i % 3
        if kind == 0:
            convs = [{"from": "human", "value": f"{q}\n<image>"}, {"from": "gpt", "value": a}]
            out.append({"id": f"s{i}", "image": images[i % len(images)], "conversations": convs})
        elif kind == 1:
            convs = [{"from": "human", "value": q}, {"from": "gpt", "value": a},
                     {"from": "human", "value": "yes no"}, {"from": "gpt", "value": "yes"}]
            out.append({"id": f"s{i}", "conversations": convs})
        else:
            convs = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a},
                     {"from": "human", "value": "1 2 3"}, {"from": "gpt", "value": ANSWERS[(i + 1) % len(ANSWERS)]}]
            out.append({"id": f"s{i}", "image": images[i % len(images)], "conversations": convs})
    return out


def write_dataset(root: Path, n: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """A JSON file of n mixed samples and its image folder."""
    images = write_images(root / "images", 4, seed)
    path = root / "data.json"
    path.write_text(json.dumps(mixed_samples(images, n), ensure_ascii=False))
    return path, root / "images"


def read_losses(output: Path) -> list[float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]
