"""Pieces of the demo recipe (scripts/make_demo.py) that need no training: the attribute labels read back from the
stage-1 captions, and the open-question subset of stage 2 used by --curriculum."""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

from parrot.demo import phrases as P
from parrot.demo.data import caption, random_scene

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_demo", ROOT / "scripts" / "make_demo.py")
make_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_demo)


def test_caption_labels_give_back_the_scene_that_was_drawn():
    rng = random.Random(5)
    for i in range(200):
        scene = random_scene(rng, 1 + i % 4)
        colour, shape, position, count = make_demo.caption_labels(caption(scene))
        assert count == len(scene.shapes) - 1
        if len(scene.shapes) == 1:
            assert (P.COLOURS[colour], P.SHAPES[shape], P.POSITIONS[position]) == (
                scene.main.colour, scene.main.shape, scene.position)
        else:
            assert (colour, shape, position) == (-100, -100, -100)


def test_open_questions_drop_the_multiple_choice_turns_and_keep_the_image_on_the_first():
    samples = [
        {"id": "a", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nQuestion: colour?\nA. red\nB. blue\nAnswer with the letter."},
            {"from": "gpt", "value": "B"},
            {"from": "human", "value": "What shape is it?"}, {"from": "gpt", "value": "It is a star."}]},
        {"id": "b", "image": "b.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich?\nA. one\nB. two"}, {"from": "gpt", "value": "A"}]},
        {"id": "c", "image": "c.png", "conversations": [
            {"from": "human", "value": "<image>\nHow many shapes?"}, {"from": "gpt", "value": "There are two shapes."},
            {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "At the top."}]},
    ]
    kept = make_demo.open_questions(samples)
    assert [x["id"] for x in kept] == ["a", "c"]
    assert kept[0]["conversations"] == [{"from": "human", "value": "<image>\nWhat shape is it?"},
                                        {"from": "gpt", "value": "It is a star."}]
    assert kept[1]["conversations"] == samples[2]["conversations"]
    for x in kept:
        texts = [t["value"] for t in x["conversations"]]
        assert sum(t.count("<image>") for t in texts) == 1 and texts[0].startswith("<image>\n")
        assert not any(re.fullmatch("[A-D]", t) for t in texts[1::2])
