"""The recipe of the demo Parrot, from nothing, with the project's public commands.

    python scripts/make_demo.py --output runs/demo            # full recipe (~15 min on 2 idle cores)
    python scripts/make_demo.py --output runs/quick --quick   # reduced sizes (the end-to-end test)
    python scripts/make_demo.py --output runs/nomoe --no-moe  # the ablation: stage 2 without the MoE

Steps (each prints its wall time; all seeded):
1. data: `parrot.demo.data.build` (shapes images; English captions; six-language instructions; held-out TSVs);
2. tokenizer: byte-level BPE trained with `tokenizers` on the training texts, ChatML special tokens;
3. a new tiny Qwen2 LLM (transformers' Qwen2ForCausalLM at its default init) and a new tiny CLIP vision
   tower: nothing is downloaded;
4. the tower pre-trained contrastively (CLIP's loss, transformers' CLIPModel with a small text encoder) on the
   stage-1 image-caption pairs;
5. `parrot train --stage 1 --llm --vision-tower` on the captions (the projector; tower and LLM frozen);
6. `parrot train --stage 2 --model <stage 1>` on the instructions (projector, MoE and LLM; tower frozen, as in
   the paper), or `--no-moe` for the ablation;
7. `parrot convert` to the final float16 official layout (the shipped model), `parrot eval` on the held-out
   TSVs on cpu (and mlx when installed), loss curves (matplotlib) into OUTPUT/loss.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL = dict(stage1=6000, stage2=24000, heldout=240, steps1=100, steps2a=600, steps2o=0, steps2=2000, batch=16,
            vocab=1400,
            lr2=2e-3,
            hidden=96, layers=3, heads=4, kv_heads=2, intermediate=256, moe_intermediate=96,
            vision_hidden=64, vision_layers=3, vision_heads=4, image_size=48, patch=8,
            clip_steps=600, clip_batch=128, clip_lr=2e-3, attribute_weight=0.0)
QUICK = dict(FULL, clip_steps=150, stage1=600, stage2=3000, heldout=24, steps1=20, steps2a=150, steps2o=0, steps2=300,
             vocab=900, hidden=96,
             layers=2, intermediate=256, moe_intermediate=64, vision_hidden=64, vision_layers=2, image_size=48)


def log(msg: str) -> None:
    print(f"[make_demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parrot(*args: str) -> None:
    cmd = [sys.executable, "-m", "parrot.cli.main", *map(str, args)]
    log("$ parrot " + " ".join(map(str, args)))
    t = time.time()
    subprocess.run(cmd, check=True)
    log(f"  done in {time.time() - t:.0f} s")


def write_tokenizer(texts: list[str], directory: Path, vocab_size: int) -> int:
    from tokenizers import AddedToken, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    from parrot.model.tokenizer import CHATML_TEMPLATE, qwen2_backend

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = qwen2_backend({}, [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    directory.mkdir(parents=True, exist_ok=True)
    data = json.loads(tok.to_str())
    data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    added = {str(tok.token_to_id(t)): {"content": t, "special": True, "normalized": False, "lstrip": False,
                                       "rstrip": False, "single_word": False} for t in special}
    cfg = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "unk_token": None, "bos_token": None, "model_max_length": 2048, "errors": "replace",
           "add_prefix_space": False, "clean_up_tokenization_spaces": False, "split_special_tokens": False,
           "chat_template": CHATML_TEMPLATE, "added_tokens_decoder": added}
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    (directory / "vocab.json").write_text(json.dumps(tok.get_vocab(), ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("\n".join(["#version: 0.2", *data["model"]["merges"]]) + "\n",
                                          encoding="utf-8")
    return tok.get_vocab_size(with_added_tokens=True)


def new_llm(directory: Path, n_tokens: int, s: dict, seed: int) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=(n_tokens + 63) // 64 * 64, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                      num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                      intermediate_size=s["intermediate"], max_position_embeddings=2048, rope_theta=10000.0,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=None, bos_token_id=None)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(directory, safe_serialization=True)
    raw = json.loads((directory / "config.json").read_text())
    raw["rope_theta"] = 10000.0  # explicit at the top level: mlx-lm reads only this key
    (directory / "config.json").write_text(json.dumps(raw, indent=2))


def new_tower(directory: Path, s: dict, seed: int) -> None:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from parrot.model.image import ImageSettings

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=s["vision_hidden"], intermediate_size=2 * s["vision_hidden"],
                           num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
                           image_size=s["image_size"], patch_size=s["patch"], projection_dim=s["vision_hidden"])
    CLIPVisionModel(cfg).save_pretrained(directory, safe_serialization=True)
    ImageSettings.clip_defaults(s["image_size"]).save(directory)


ATTRIBUTE_SIZES = (8, 4, 4, 4)  # colours, shapes, positions, counts


def caption_labels(text: str) -> list[int]:
    """(colour, shape, position, count) indices of a stage-1 caption; -100 where the caption does not say (the
    colour, shape and position of the shape are labelled on one-shape images only, as the questions ask them)."""
    from parrot.demo import phrases as P

    words = text.lower().rstrip(".").replace(",", " ").split()
    if words[1] == "shapes:":
        return [-100, -100, -100, ["one", "two", "three", "four"].index(words[0])]
    colour, shape = words[1], words[2]
    position = next(p for p in P.POSITIONS if p in words)
    return [P.COLOURS.index(colour), P.SHAPES.index(shape), P.POSITIONS.index(position), 0]


def pretrain_tower(data: Path, tok_dir: Path, directory: Path, s: dict, seed: int) -> list[float]:
    """Contrastive pre-training (CLIP's loss, transformers' CLIPModel) of the tower on the stage-1 image-caption
    pairs, with a small text encoder over the demo's tokenizer; saves the vision half. Returns the loss curve."""
    import numpy as np
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionModel

    from parrot.model.image import ImageSettings, preprocess
    from parrot.model.tokenizer import Tokenizer

    torch.manual_seed(seed)
    tok = Tokenizer.from_dir(tok_dir)
    eos, pad = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    pairs = [(x["image"], x["conversations"][1]["value"]) for x in json.loads((data / "stage1.json").read_text())]
    settings = ImageSettings.clip_defaults(s["image_size"])
    pixels = torch.from_numpy(np.concatenate([preprocess(data / "images" / im, settings) for im, _ in pairs]))
    ids = [tok.encode(c)[:30] + [eos] for _, c in pairs]
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    mask = (torch.arange(width)[None] < torch.tensor([len(x) for x in ids])[:, None]).long()
    vision = CLIPVisionModel.from_pretrained(directory).config
    text = CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=width, eos_token_id=eos, pad_token_id=pad,
                          projection_dim=64)
    clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64))
    # supervised attribute heads on the features Parrot takes (hidden_states[-2], mean over the tokens): the labels
    # are read from the synthetic captions themselves, so the tower learns to make colour, shape, position and
    # count linearly decodable (contrastive learning alone left the shape at 43%, docs/demo.md)
    labels = torch.tensor([caption_labels(c) for _, c in pairs])  # [N, 4]: colour, shape, position, count; -100
    heads = torch.nn.ModuleList(torch.nn.Linear(vision.hidden_size, n) for n in ATTRIBUTE_SIZES
                                if s["attribute_weight"])
    params = [*clip.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=s["clip_lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s["clip_lr"], total_steps=s["clip_steps"], pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    losses, t = [], time.time()
    for step in range(s["clip_steps"]):
        b = torch.randint(0, len(pairs), (s["clip_batch"],), generator=g)
        out = clip(input_ids=input_ids[b], attention_mask=mask[b], pixel_values=pixels[b], return_loss=True,
                   output_hidden_states=True)
        loss = out.loss
        if s["attribute_weight"]:
            feats = out.vision_model_output.hidden_states[-2].mean(1)
            # shape, position and count are learnt on recoloured copies (each image's channels permuted and some
            # inverted): the held-out split pairs colours with shapes never seen together, so the shape features must
            # not lean on the colour (without this a probe reads 8% of the held-out shapes, below chance)
            perm = torch.argsort(torch.rand(len(b), 3, generator=g), dim=1)
            sign = torch.where(torch.rand(len(b), 3, 1, 1, generator=g) < 0.5, -1.0, 1.0)
            recoloured = torch.gather(pixels[b], 1, perm[:, :, None, None].expand_as(pixels[b])) * sign
            feats_rc = clip.vision_model(pixel_values=recoloured, output_hidden_states=True).hidden_states[-2].mean(1)
            for k, head in enumerate(heads):
                loss = loss + s["attribute_weight"] * torch.nn.functional.cross_entropy(
                    head(feats if k == 0 else feats_rc), labels[b, k], ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            rate = (step + 1) / (time.time() - t)
            log(f"  contrastive step {step + 1}/{s['clip_steps']}: loss {np.mean(losses[-50:]):.3f} "
                f"({rate:.1f} step/s, ETA {(s['clip_steps'] - step - 1) / rate:.0f} s)")
    clip.vision_model.save_pretrained(directory, safe_serialization=True)  # a CLIPVisionModel
    (directory.parent / "clip-pretrain-metrics.jsonl").write_text(
        "".join(json.dumps({"step": i + 1, "loss": x}) + "\n" for i, x in enumerate(losses)))
    return losses


def scale_tower(directory: Path, data: Path, s: dict, target_rms: float = 0.2) -> float:
    """Rescales the tower's residual stream so the features Parrot takes (hidden_states[-2]) have RMS `target_rms`,
    near the LLM's embedding scale: pre_layrnorm and every block's out_proj / fc2 are multiplied by one factor.
    Every LayerNorm inside CLIP is scale-invariant, so this is an exact reparametrization (the tower's normalized
    outputs do not change). Why: the MoE's SwiGLU experts are quadratic in their input; on features of RMS ~2 their
    image-independent part swamps the visual tokens and the LLM learns to ignore the image. Returns the factor."""
    import numpy as np
    import torch
    from transformers import CLIPVisionModel

    from parrot.model.image import ImageSettings, preprocess

    tower = CLIPVisionModel.from_pretrained(directory).eval()
    images = sorted((data / "images").glob("s1_*"))[:64]
    pixels = torch.from_numpy(np.concatenate([preprocess(p, ImageSettings.clip_defaults(s["image_size"]))
                                              for p in images]))
    with torch.no_grad():
        h = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        alpha = target_rms / float(h.pow(2).mean().sqrt())
        state = tower.state_dict()
        for k, v in state.items():
            if "pre_layrnorm" in k or ".out_proj." in k or ".fc2." in k:
                v.mul_(alpha)
        tower.load_state_dict(state)
    tower.save_pretrained(directory, safe_serialization=True)
    return alpha


def open_questions(samples: list[dict]) -> list[dict]:
    """The stage-2 samples with their multiple-choice turns removed (answered with one letter), for the curriculum."""
    import re

    kept = []
    for x in samples:
        turns = [(q["value"].replace("<image>\n", ""), a["value"])
                 for q, a in zip(x["conversations"][::2], x["conversations"][1::2])
                 if not re.fullmatch(r"[A-D]", a["value"].strip())]
        if turns:
            convs = []
            for t, (q, a) in enumerate(turns):
                convs += [{"from": "human", "value": f"<image>\n{q}" if t == 0 else q}, {"from": "gpt", "value": a}]
            kept.append({**x, "conversations": convs})
    return kept


def plot_losses(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: v for k, v in runs.items() if (v / "metrics.jsonl").is_file()
            or (v / "clip-pretrain-metrics.jsonl").is_file()}
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.2))
    for ax, (name, run) in zip(axes, runs.items()):
        f = run / "metrics.jsonl" if (run / "metrics.jsonl").is_file() else run / "clip-pretrain-metrics.jsonl"
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="reduced sizes (the end-to-end test)")
    ap.add_argument("--no-moe", action="store_true", help="stage 2 without the MoE (the ablation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps2", type=int, help="stage 2 optimizer steps (default: the preset's)")
    ap.add_argument("--attribute-heads", action="store_true",
                    help="experiment: supervised colour/shape/position/count heads in the tower pre-training "
                    "(labels from the captions; shape, position and count on recoloured images)")
    ap.add_argument("--curriculum", action="store_true",
                    help="experiment: stage 2 on the open questions (800 steps) before the full mixture (1,400)")
    ap.add_argument("--data", type=Path, help="reuse the data and tokenizer of this earlier run's OUTPUT folder")
    ap.add_argument("--backends", default="cpu,mlx", help="where to evaluate (mlx only when importable)")
    args = ap.parse_args()
    s = dict(QUICK if args.quick else FULL)
    if args.attribute_heads:
        s["attribute_weight"] = 1.0
    if args.curriculum:
        s["steps2o"], s["steps2"] = (100, 200) if args.quick else (800, 1400)
    if args.steps2:
        s["steps2"] = args.steps2
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # faster than 2 threads next to the data worker
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    base = args.data or out
    data, tok_dir, llm, tower = base / "data", base / "tokenizer", out / "qwen2-init", out / "clip-init"
    t0 = time.time()
    if args.data is None:
        from parrot.demo.data import build, corpus

        log(f"1. data -> {data}")
        counts = build(data, n_stage1=s["stage1"], n_stage2=s["stage2"], n_heldout=s["heldout"], seed=args.seed)
        log(f"  {counts}")
        log("2. BPE tokenizer on the training texts")
        write_tokenizer(corpus(data), tok_dir, s["vocab"])
    if not (llm / "config.json").is_file():
        from parrot.model.tokenizer import Tokenizer

        n_tok = Tokenizer.from_dir(tok_dir).vocab_size
        log(f"3. new tiny Qwen2 LLM and CLIP tower (default init), {n_tok} tokens")
        new_llm(llm, n_tok, s, args.seed)
        for f in tok_dir.iterdir():
            (llm / f.name).write_bytes(f.read_bytes())
        if args.data is not None and (base / "clip-init" / "model.safetensors").is_file():
            log(f"4. reusing the pre-trained tower of {base}")
            shutil.copytree(base / "clip-init", tower)
            if (base / "clip-pretrain-metrics.jsonl").is_file():
                shutil.copy(base / "clip-pretrain-metrics.jsonl", out / "clip-pretrain-metrics.jsonl")
        else:
            new_tower(tower, s, args.seed + 1)
            log("4. contrastive pre-training of the tower on the captions (transformers' CLIPModel)")
            pretrain_tower(data, tok_dir, tower, s, args.seed)
        log(f"  tower features rescaled by {scale_tower(tower, data, s):.4f} (exact reparametrization)")
    common = ["--backend", "cpu", "--seed", str(args.seed), "--num-workers", "1", "--no-grad-checkpoint",
              "--batch-size", str(s["batch"]), "--grad-accum", "1", "--save-every", "100000", "--warmup-ratio", "0.05"]
    s1, s2a, s2 = out / "stage1", out / "stage2-captions", out / "stage2"
    no_moe = ["--no-moe"] if args.no_moe else []
    parrot("train", "--stage", "1", "--llm", llm, "--vision-tower", tower, "--data", data / "stage1.json",
           "--image-dir", data / "images", "--output", s1, "--lr", "1e-3", "--max-steps", s["steps1"],
           "--moe-intermediate-size", s["moe_intermediate"], *common)
    # the LLM is new, so it first learns to describe the pictures (stage 2's trainer on the captions): without this
    # grounding step the six-language instructions teach it to answer from the question alone (see docs/demo.md)
    parrot("train", "--stage", "2", "--model", s1, "--data", data / "stage1.json", "--image-dir", data / "images",
           "--output", s2a, "--lr", s["lr2"], "--max-steps", s["steps2a"], *no_moe, *common)
    # curriculum: the open questions first (short answers that name what is in the image), then the full mixture
    # with the multiple-choice questions, whose letter answers give the LLM no word to tie to the picture
    prev = s2a
    if s["steps2o"]:
        s2o = out / "stage2-open"
        open_json = out / "stage2-open.json"
        open_json.write_text(json.dumps(open_questions(json.loads((data / "stage2.json").read_text())),
                                        ensure_ascii=False), encoding="utf-8")
        parrot("train", "--stage", "2", "--model", s2a, "--data", open_json, "--image-dir", data / "images",
               "--output", s2o, "--lr", s["lr2"], "--max-steps", s["steps2o"], *no_moe, *common)
        prev = s2o
    parrot("train", "--stage", "2", "--model", prev, "--data", data / "stage2.json", "--image-dir", data / "images",
           "--output", s2, "--lr", s["lr2"], "--max-steps", s["steps2"], *no_moe, *common)
    final = out / "model"
    parrot("convert", s2, final, "--to", "hf", "--dtype", "float16")
    cfg = json.loads((final / "config.json").read_text())  # the tower is inside (weights + vision_config): name it
    cfg["mm_vision_tower"] = "demo-clip-vit-48"  # instead of this machine's absolute path
    (final / "config.json").write_text(json.dumps(cfg, indent=2))
    plot_losses({"tower (contrastive)": out, "stage 1 (captions)": s1, "stage 2 on the captions": s2a,
                 "stage 2 (open questions)": out / "stage2-open", "stage 2 (instructions)": s2},
                out / "loss.png")
    tsvs = sorted((data / "heldout").glob("demo_*.tsv"))
    results = {}
    from parrot import registry
    from parrot.errors import ParrotError

    for backend in args.backends.split(","):
        try:
            registry.require(backend)
        except ParrotError as e:
            log(f"skipping the evaluation on {backend}: {e}")
            continue
        parrot("eval", *tsvs, "--model", final, "--backend", backend, "--output", out / f"eval-{backend}",
               "--batch-size", "16", "--max-tokens", "8", "--quiet")
        results[backend] = json.loads((out / f"eval-{backend}" / "summary.json").read_text())
    (out / "results.json").write_text(json.dumps({"settings": s, "moe": not args.no_moe, "eval": results,
                                                  "seconds": round(time.time() - t0)}, indent=2))
    log(f"all done in {time.time() - t0:.0f} s; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
