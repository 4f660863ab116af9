"""Training data: official labels, up-front validation, batching plan, LR schedule (no torch model)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from train_helpers import ANSWERS, write_images

from parrot.errors import ParrotError
from parrot.model.checkpoint import Checkpoint
from parrot.model.tokenizer import Tokenizer
from parrot.training.data import (
    IMAGE_MISSING,
    IMAGE_UNREADABLE,
    IMAGE_UNUSED,
    MALFORMED,
    MANY_IMAGES,
    NO_ANSWER,
    NO_LABEL_LEFT,
    PLACEHOLDER_NO_IMAGE,
    TOO_LONG,
    LlavaData,
    collate,
    splice_labels,
)
from parrot.training.schedule import StepPlan, cosine_lr_factor, warmup_steps

IGNORE, IMAGE = -100, -200


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return Checkpoint.open(tiny_ckpt)


@pytest.fixture(scope="module")
def hf_tok(tiny_ckpt):
    """transformers' own tokenizer for the tiny checkpoint: what the official formatter calls."""
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(str(tiny_ckpt))


def official_rule(hf_tok, conversations: list[dict], has_image: bool) -> tuple[list[int], list[int]]:
    """An independent re-implementation of the official QwenConversationFormatter + data pipeline rule."""
    roles = {"system": "<|im_start|>system\n", "human": "<|im_start|>user\n", "gpt": "<|im_start|>assistant\n"}
    convs = [dict(c) for c in conversations]
    if has_image:
        for c in convs:
            if "<image>" in c["value"]:
                c["value"] = ("<image>\n" + c["value"].replace("<image>", "").strip()).strip()
    if convs[0]["from"] != "system":
        convs = [{"from": "system", "value": "You are a helpful assistant."}] + convs

    def enc(text):
        out = []
        for j, chunk in enumerate(text.split("<image>")):
            if j:
                out.append(IMAGE)
            out += hf_tok(chunk, add_special_tokens=False).input_ids
        return out

    header = len(hf_tok(roles["gpt"], add_special_tokens=False).input_ids)
    ids, labels = [], []
    for i, c in enumerate(convs):
        text = roles[c["from"]] + c["value"] + "<|im_end|>" + ("\n" if i < len(convs) - 1 else "")
        t = enc(text)
        ids += t
        labels += [IGNORE] * header + t[header:] if c["from"] == "gpt" else [IGNORE] * len(t)
    return ids, labels


def _data(tmp_path, ckpt, samples, max_length=2048, truncate=False, image_dir=None) -> LlavaData:
    p = tmp_path / "data.json"
    p.write_text(json.dumps(samples, ensure_ascii=False))
    tok = Tokenizer.from_dir(ckpt.path)
    n_vis = ckpt.config.num_visual_tokens(ckpt.tower.config)
    return LlavaData(p, image_dir or tmp_path, tok, ckpt.tower.image, n_vis, max_length, truncate)


CASES = {
    "single_turn_image": ({"image": "img0.png", "conversations": [
        {"from": "human", "value": "What is in the picture?\n<image>"}, {"from": "gpt", "value": ANSWERS[0]}]}),
    "multi_turn_image": ({"image": "img1.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image in detail."}, {"from": "gpt", "value": ANSWERS[1]},
        {"from": "human", "value": "这张图片里有什么？"}, {"from": "gpt", "value": ANSWERS[4]}]}),
    "text_only_multi_turn": ({"conversations": [
        {"from": "human", "value": "The quick brown fox?"}, {"from": "gpt", "value": "jumps over the lazy dog."},
        {"from": "human", "value": "yes no"}, {"from": "gpt", "value": ""}]}),
    "system_turn": ({"conversations": [
        {"from": "system", "value": "Answer with the option's letter."}, {"from": "human", "value": "A. B. C."},
        {"from": "gpt", "value": "B"}]}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_labels_match_the_official_rule(case, tmp_path, ckpt, hf_tok):
    write_images(tmp_path, 2)
    sample = {"id": case, **CASES[case]}
    data = _data(tmp_path, ckpt, [sample])
    item = data.item(0)
    ids, labels = official_rule(hf_tok, sample["conversations"], "image" in sample)
    assert item["input_ids"].tolist() == ids
    assert item["labels"].tolist() == labels
    # supervised = exactly each answer + <|im_end|> (+ the "\n" after non-final turns)
    answers = [c["value"] for c in sample["conversations"] if c["from"] == "gpt"]
    want = "".join(a + "<|im_end|>" + ("\n" if k < len(answers) - 1 or sample["conversations"][-1]["from"] != "gpt"
                                        else "") for k, a in enumerate(answers))
    got = hf_tok.decode([t for t in item["labels"].tolist() if t != IGNORE])
    assert got == want
    n_vis = ckpt.config.num_visual_tokens(ckpt.tower.config)
    n_img = int("image" in sample)
    assert data.samples[0].length == len(ids) + n_img * (n_vis - 1)
    assert data.samples[0].num_labels == sum(1 for t in labels if t != IGNORE)
    assert item["has_image"] == bool(n_img)


def test_bad_samples_are_reported_and_skipped(tmp_path, ckpt):
    names = write_images(tmp_path, 2)
    (tmp_path / "not_an_image.png").write_text("hello")
    good = {"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]}
    long_answer = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)
    samples = [
        {"id": "ok-image", "image": names[0], **good},
        {"id": "ok-text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "missing", "image": "nope.png", **good},
        {"id": "corrupt", "image": "not_an_image.png", **good},
        {"id": "empty", "conversations": []},
        {"id": "no-convs"},
        {"id": "bad-role", "conversations": [{"from": "bot", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"id": "bad-value", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}]},
        ["not", "an", "object"],
        {"id": "no-answer", "conversations": [{"from": "human", "value": "Hi"}]},
        {"id": "placeholder-no-image", **good},
        {"id": "image-unused", "image": names[1],
         "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A cat."}]},
        {"id": "two-images", "image": names[1], "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "<image> and?"}, {"from": "gpt", "value": "A dog."}]},
        {"id": "too-long", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": long_answer}]},
    ]
    data = _data(tmp_path, ckpt, samples, max_length=200)
    assert [s.id for s in data.samples] == ["ok-image", "ok-text"]
    ids = {reason: [d["id"] for d in v] for reason, v in data.report.dropped.items()}
    assert ids == {
        IMAGE_MISSING: ["missing"], IMAGE_UNREADABLE: ["corrupt"],
        MALFORMED: ["empty", "no-convs", "bad-role", "bad-value", "#8"], NO_ANSWER: ["no-answer"],
        PLACEHOLDER_NO_IMAGE: ["placeholder-no-image"], IMAGE_UNUSED: ["image-unused"],
        MANY_IMAGES: ["two-images"], TOO_LONG: ["too-long"],
    }
    summary = data.report.summary()
    assert "2 of 14 samples kept" in summary and "dropped 5: empty or malformed conversations" in summary


def test_truncate_keeps_long_samples_cut_after_the_visual_tokens(tmp_path, ckpt):
    names = write_images(tmp_path, 1)
    n_vis = ckpt.config.num_visual_tokens(ckpt.tower.config)
    long_answer = " ".join(["The quick brown fox jumps over the lazy dog."] * 10)
    sample = {"id": "long", "image": names[0], "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": long_answer}]}
    full = _data(tmp_path, ckpt, [sample])
    max_length = full.samples[0].length - 20
    cut = _data(tmp_path, ckpt, [sample], max_length=max_length, truncate=True)
    assert cut.report.truncated == 1 and cut.samples[0].length == max_length
    assert cut.samples[0].num_labels == full.samples[0].num_labels - 20  # the last 20 spliced tokens are answer tokens
    with pytest.raises(ParrotError, match="no usable training sample"):
        _data(tmp_path, ckpt, [sample], max_length=max_length)  # dropped without --truncate
    item = full.item(0)
    spliced = splice_labels(item["input_ids"].tolist(), item["labels"].tolist(), n_vis)
    first_label = next(i for i, lab in enumerate(spliced) if lab != IGNORE)
    with pytest.raises(ParrotError, match=NO_LABEL_LEFT.replace("-", ".")):  # nothing supervised survives the cut
        _data(tmp_path, ckpt, [sample], max_length=first_label, truncate=True)
    assert _data(tmp_path, ckpt, [sample], max_length=first_label + 1, truncate=True).samples[0].num_labels == 1


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"), ('{"id": 1}', "expected a JSON list"), (None, "not found"),
])
def test_unusable_data_files_raise_clear_errors(tmp_path, ckpt, content, needle):
    p = tmp_path / "data.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(ParrotError, match=needle):
        LlavaData(p, tmp_path, Tokenizer.from_dir(ckpt.path), ckpt.tower.image, 26)


def test_collate_pads_right_and_gives_text_only_samples_a_zeros_image(tmp_path, ckpt):
    names = write_images(tmp_path, 1)
    samples = [{"image": names[0], "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                     {"from": "gpt", "value": "A cat."}]},
               {"conversations": [{"from": "human", "value": "Hi there, how are you?"},
                                  {"from": "gpt", "value": "Hello"}]}]
    data = _data(tmp_path, ckpt, samples)
    b = collate([data.item(0), data.item(1)], pad_id=data.tokenizer.pad_id)
    n0, n1 = len(data.item(0)["input_ids"]), len(data.item(1)["input_ids"])
    T = max(n0, n1)
    assert b["input_ids"].shape == (2, T) and b["attention_mask"].sum(1).tolist() == [n0, n1]
    short = int(np.argmin([n0, n1]))
    assert (b["input_ids"][short, min(n0, n1):] == data.tokenizer.pad_id).all()
    assert (b["labels"][short, min(n0, n1):] == IGNORE).all()
    assert np.abs(b["pixel_values"][0]).sum() > 0 and not b["pixel_values"][1].any()
    lengths = [s.length for s in data.samples]
    assert b["num_tokens"] == sum(lengths) and b["padded_tokens"] == 2 * max(lengths)
    assert b["num_label_tokens"] == sum(s.num_labels for s in data.samples)


def test_plan_gives_the_same_global_batches_whatever_the_split():
    a = StepPlan(10, batch_size=4, grad_accum=1, seed=3)
    b = StepPlan(10, batch_size=1, grad_accum=4, seed=3)
    c = StepPlan(10, batch_size=1, grad_accum=2, seed=3, world_size=2)
    assert a.total_steps == b.total_steps == c.total_steps == 3
    for s in range(3):
        ga = sorted(i for mb in a.micro_batches(s) for i in mb)
        gb = sorted(i for mb in b.micro_batches(s) for i in mb)
        gc = sorted(i for r in range(2) for mb in c.micro_batches(s, r) for i in mb)
        assert ga == gb == gc
    assert [len(mb) for mb in b.micro_batches(2)] == [1, 1]  # the last, partial step still steps
    seen = sorted(i for s in range(3) for mb in a.micro_batches(s) for i in mb)
    assert seen == list(range(10))  # one epoch = every sample once


def test_max_steps_cycles_the_data_with_a_new_order_each_epoch():
    p = StepPlan(5, batch_size=2, grad_accum=1, seed=0, epochs=1, max_steps=7)
    assert p.total_steps == 7 and p.steps_per_epoch == 3
    e0 = [i for s in range(3) for mb in p.micro_batches(s) for i in mb]
    e1 = [i for s in range(3, 6) for mb in p.micro_batches(s) for i in mb]
    assert sorted(e0) == sorted(e1) == list(range(5)) and e0 != e1
    assert p.position(6) == (2, 0)


def test_lr_schedule_matches_transformers_cosine_with_warmup():
    import torch
    from transformers import get_cosine_schedule_with_warmup

    total = 37
    warm = warmup_steps(total, 0.03)
    assert warm == math.ceil(total * 0.03)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, warm, total)
    want = []
    for _ in range(total):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    got = [cosine_lr_factor(s, total, warm) for s in range(total)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got[0] == 0.0 and got[warm] == 1.0
