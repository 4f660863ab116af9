"""What `parrot demo` asks: the bundled images and, for each, questions in the six languages.

The bundled images (`parrot_core/demo/images/`) were drawn by `write_bundled_images` from scenes the
model never saw in training: the one-shape scenes hold held-out (colour, shape, position) combinations.
The file name says what is in the picture, so the answers can be checked by eye.
"""

from __future__ import annotations

import random
from pathlib import Path

from . import phrases as P

IMAGE_DIR = Path(__file__).resolve().parent / "images"
NUMBER = ["one", "two", "three", "four"]


def bundled_images() -> list[Path]:
    return sorted(IMAGE_DIR.glob("*.png"))


def questions_for(image_name: str | None) -> list[tuple[str, str]]:
    """(language, question) pairs: for a bundled image the questions that fit it (its name tells), one per
    language; for any other image every language asks colour, shape, count and position in turn."""
    if image_name is not None and "_shapes" in image_name:
        kinds = ["count"] * len(P.LANGS)
    elif image_name is not None:
        kinds = ["colour", "shape", "position", "colour", "shape", "position"]
    else:
        kinds = [P.QTYPES[i % len(P.QTYPES)] for i in range(len(P.LANGS))]
    return [(lang, P.QUESTIONS[lang][k][0]) for lang, k in zip(P.LANGS, kinds)]


def write_bundled_images(directory: str | Path, seed: int = 7) -> list[Path]:
    """The demo's images: four one-shape scenes (held-out colour/shape/position combinations) and two counting
    scenes."""
    from .data import Scene, Shape, render  # (the data generator needs the eval extras: pandas)

    rng = random.Random(seed)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    scenes = [
        ("red_circle_left", Scene(120, 90, (150, 160, 175), [Shape("red", "circle", 28, 46, 21)], "left")),
        ("blue_triangle_bottom", Scene(80, 110, (200, 190, 150), [Shape("blue", "triangle", 40, 85, 19)], "bottom")),
        ("orange_square_top", Scene(100, 100, (70, 80, 90), [Shape("orange", "square", 52, 29, 23)], "top")),
        ("black_star_right", Scene(140, 100, (180, 150, 170), [Shape("black", "star", 109, 50, 24)], "right")),
        ("three_shapes", Scene(128, 96, (120, 130, 120), [Shape("white", "square", 28, 30, 12),
                                                          Shape("orange", "triangle", 90, 28, 13),
                                                          Shape("purple", "circle", 60, 70, 13)], None)),
        ("two_shapes", Scene(96, 96, (190, 200, 210), [Shape("black", "star", 30, 66, 14),
                                                      Shape("blue", "circle", 70, 28, 12)], None)),
    ]
    out = []
    for name, scene in scenes:
        p = d / f"{name}.png"
        render(scene, rng).save(p)
        out.append(p)
    return out
