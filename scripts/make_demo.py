"""The recipe of the demo Parrot, from nothing, with the project's public commands.

    python scripts/make_demo.py --output runs/demo            # full recipe (about 30 min on 2 cores)
    python scripts/make_demo.py --output runs/quick --quick   # reduced sizes (the end-to-end test)
    python scripts/make_demo.py --output runs/nomoe --no-moe  # the ablation: stage 2 without the MoE

Steps (each prints its wall time; all seeded):
1. data: `parrot.demo.data.build` (shapes images; English captions; six-language instructions; held-out TSVs);
2. tokenizer: byte-level BPE trained with `tokenizers` on the training texts, ChatML special tokens;
3. a new tiny Qwen2 LLM (transformers' Qwen2ForCausalLM at its default init) and a new tiny CLIP vision
   tower: nothing is downloaded;
4. the tower pre-trained with supervision (cosine heads on every token of hidden_states[-2]) on the colour, shape,
   position and count of the training images (labels.json), then its residual stream rescaled;
5. `parrot train --stage 1 --llm --vision-tower` on the captions (the projector; tower and LLM frozen);
6. `parrot train --stage 2` on the instructions (projector, MoE and LLM; tower frozen, as in the paper) as a
   curriculum of four runs, each from the one before: colour turns only; position turns only with the projector
   and the MoE held (learning rate 0); colour, shape and position; then the whole mixture (count); or
   `--no-moe` for the ablation;
7. `parrot convert` to the final float16 official layout, `parrot eval` on the held-out
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

FULL = dict(stage1=6000, stage2=24000, heldout=240, tie=True, steps1=200, steps2=3000, batch=16, vocab=1400, lr2=2e-3,
            hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, moe_intermediate=128,
            vision_hidden=64, vision_layers=3, vision_heads=4, image_size=48, patch=8,
            tower_steps=5000, tower_batch=128, tower_lr=2e-3, tower_temperature=16.0, eval_every=500, eval_limit=40)
QUICK = dict(FULL, stage1=600, stage2=3000, heldout=24, steps1=20, steps2=1000, vocab=900, hidden=96, layers=2,
             intermediate=256, moe_intermediate=64, vision_layers=2, tower_steps=300, eval_every=100, eval_limit=12)


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
                      rms_norm_eps=1e-6, tie_word_embeddings=s["tie"], eos_token_id=None, bos_token_id=None)
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


# stage 2's curriculum, one phase per entry; the last is the whole mixture (count, every multiple-choice turn)
# (question types, projector and MoE held): the second phase teaches position alone with the projector and the
# MoE at learning rate 0 (the LLM alone learns): trained, they let colour, taught first, fill the visual tokens, and
# position taught later was never read (docs/demo.md, fifth and sixth passes)
PHASES = [(("colour",), False), (("position",), True), (("colour", "shape", "position"), False),
          (("colour", "shape", "position", "count"), False)]


def phase_steps(total: int) -> list[int]:
    """The stage-2 steps of each phase: 2/15, 2/15, 4/15 and the rest (400, 400, 800, 1400 of 3000)."""
    first = [total * 2 // 15, total * 2 // 15, total * 4 // 15]
    return [*first, total - sum(first)]


ATTRIBUTES = {"colour": 8, "shape": 4, "position": 4, "count": 4}  # what the tower learns to see, and how many values


def label_matrix(labels: dict, names: list[str]):
    """[N, 4] class indices (colour, shape, position, count - 1) of the named images; -100 where an image has no
    such attribute (colour, shape and position are asked of one-shape images only)."""
    import numpy as np

    from parrot.demo import phrases as P

    values = {"colour": P.COLOURS, "shape": P.SHAPES, "position": P.POSITIONS, "count": P.COUNTS}
    return np.array([[values[k].index(labels[n][k]) if labels[n][k] is not None else -100 for k in ATTRIBUTES]
                     for n in names])


def variance_shares(tokens, y) -> dict:
    """For each attribute, the share of the visual tokens' variance (over images, all tokens) that its class means
    explain: how loudly the features Parrot takes say it (a linear probe may read an attribute that is quiet)."""
    x = tokens.reshape(len(tokens), -1).double()
    x = x - x.mean(0)
    total = float(x.pow(2).sum(1).mean())
    out = {}
    for k, name in enumerate(ATTRIBUTES):
        ok = y[:, k] != -100
        xs, ys = x[ok] - x[ok].mean(0), y[ok, k]
        between = sum(float((ys == c).sum()) * float(xs[ys == c].mean(0).pow(2).sum()) for c in ys.unique())
        out[name] = round(100 * between / len(xs) / total, 1)
    return out


def pretrain_tower(data: Path, directory: Path, s: dict, seed: int) -> list[float]:
    """Supervised pre-training of the new CLIP tower (transformers' CLIPVisionModel) on the training images: four
    heads on the features Parrot takes (hidden_states[-2]) learn colour, shape, position and count by cross-entropy
    from every visual token, with the labels the data generator wrote (labels.json). The stand-in for
    the web-scale pre-training of the released model's CLIP; the heads are dropped. Returns the loss curve."""
    import numpy as np
    import torch
    from transformers import CLIPVisionModel

    from parrot.model.image import ImageSettings, preprocess

    torch.manual_seed(seed)
    labels = json.loads((data / "labels.json").read_text())
    names = sorted(labels)
    settings = ImageSettings.clip_defaults(s["image_size"])
    t = time.time()
    pixels = torch.from_numpy(np.concatenate([preprocess(data / "images" / n, settings) for n in names]))
    y = torch.from_numpy(label_matrix(labels, names))
    log(f"  {len(names)} images preprocessed in {time.time() - t:.0f} s")
    tower = CLIPVisionModel.from_pretrained(directory)
    # every token answers for the whole picture, so the LLM can read any visual token (with heads on the tokens'
    # mean the colour stayed in the few tokens covering the shape, and the LLM never learnt to find it: docs/demo.md);
    # cosine heads (unit-norm class vectors against the centred, unit-norm token, a fixed temperature) bound the
    # logit margin, so every attribute must take a large share of each token
    heads = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(n, tower.config.hidden_size) * 0.02)
                                   for n in ATTRIBUTES.values())

    def logits(feats: torch.Tensor, k: int) -> torch.Tensor:
        """[B, T, C] visual tokens -> [B, T, classes]: every token is asked about the whole picture."""
        f = torch.nn.functional.normalize(feats - feats.mean((0, 1), keepdim=True), dim=-1)
        return s["tower_temperature"] * f @ torch.nn.functional.normalize(heads[k], dim=-1).t()

    def loss_of(feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = feats.shape[1]
        return sum(torch.nn.functional.cross_entropy(logits(feats, k).flatten(0, 1),
                                                     labels[:, k].repeat_interleave(t), ignore_index=-100)
                   for k in range(len(ATTRIBUTES)))

    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=s["tower_lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s["tower_lr"], total_steps=s["tower_steps"],
                                                pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    n_val = len(names) // 20  # the last 5% of the images check what the tower learnt (not trained on)
    n_train = len(names) - n_val

    def val_features() -> torch.Tensor:
        with torch.no_grad():
            return tower(pixel_values=pixels[n_train:], output_hidden_states=True).hidden_states[-2]

    def val_accuracy(feats: torch.Tensor) -> dict:
        acc = {}  # over every visual token of every image
        for k, name in enumerate(ATTRIBUTES):
            ok = y[n_train:, k] != -100
            right = logits(feats, k)[ok].argmax(-1) == y[n_train:, k][ok][:, None]
            acc[name] = round(100 * float(right.float().mean()), 1)
        return acc

    losses, t = [], time.time()
    for step in range(s["tower_steps"]):
        b = torch.randint(0, n_train, (s["tower_batch"],), generator=g)
        loss = loss_of(tower(pixel_values=pixels[b], output_hidden_states=True).hidden_states[-2], y[b])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            rate = (step + 1) / (time.time() - t)
            log(f"  tower step {step + 1}/{s['tower_steps']}: loss {np.mean(losses[-250:]):.3f} "
                f"({rate:.1f} step/s, ETA {(s['tower_steps'] - step - 1) / rate:.0f} s)")
        if (step + 1) % 1000 == 0 and step + 1 < s["tower_steps"]:
            log(f"  tower accuracy on {n_val} images it does not train on (percent): {val_accuracy(val_features())}")
    feats = val_features()  # the trained tower's, once: accuracy and variance shares
    acc, share = val_accuracy(feats), variance_shares(feats, y[n_train:])
    log(f"  tower accuracy on {n_val} images it does not train on (percent): {acc}")
    log(f"  share of the visual tokens' variance each attribute explains (percent): {share}")
    (directory.parent / "tower-accuracy.json").write_text(json.dumps({"accuracy": acc, "variance_share": share}))
    tower.save_pretrained(directory, safe_serialization=True)
    (directory.parent / "tower-pretrain-metrics.jsonl").write_text(
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


def plot_losses(runs: dict[str, Path | list[Path]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {k: v if isinstance(v, list) else [v] for k, v in runs.items()}
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.2))
    for ax, (name, parts) in zip(axes, runs.items()):
        offset = 0
        for run in parts:  # phases one after the other
            f = run / "metrics.jsonl" if (run / "metrics.jsonl").is_file() else run / "tower-pretrain-metrics.jsonl"
            rows = [r for r in map(json.loads, filter(str.strip, f.read_text().splitlines())) if "loss" in r]
            ax.plot([offset + r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
            offset += rows[-1]["step"] if rows else 0
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
    ap.add_argument("--data", type=Path, help="reuse the data and tokenizer of this earlier run's OUTPUT folder")
    ap.add_argument("--backends", default="cpu,mlx", help="where to evaluate (mlx only when importable)")
    args = ap.parse_args()
    s = dict(QUICK if args.quick else FULL)
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
            if (base / "tower-pretrain-metrics.jsonl").is_file():
                shutil.copy(base / "tower-pretrain-metrics.jsonl", out / "tower-pretrain-metrics.jsonl")
        else:
            new_tower(tower, s, args.seed + 1)
            log("4. supervised pre-training of the tower on the training images (transformers' CLIPVisionModel)")
            pretrain_tower(data, tower, s, args.seed)
        log(f"  tower features rescaled by {scale_tower(tower, data, s):.4f} (exact reparametrization)")
    common = ["--backend", "cpu", "--seed", str(args.seed), "--num-workers", "1", "--no-grad-checkpoint",
              "--batch-size", str(s["batch"]), "--grad-accum", "1", "--save-every", "100000", "--warmup-ratio", "0.05"]
    s1, s2 = out / "stage1", out / "stage2"
    no_moe = ["--no-moe"] if args.no_moe else []
    parrot("train", "--stage", "1", "--llm", llm, "--vision-tower", tower, "--data", data / "stage1.json",
           "--image-dir", data / "images", "--output", s1, "--lr", "1e-3", "--max-steps", s["steps1"],
           "--moe-intermediate-size", s["moe_intermediate"], *common)
    # the held-out accuracy is followed during stage 2 (`parrot eval`'s scorer, the first questions of each language)
    watch = [x for tsv in sorted((data / "heldout").glob("demo_*.tsv")) for x in ("--eval-data", tsv)]
    # stage 2 as a curriculum over question types (PHASES; all six languages throughout): trained on the full mixture
    # at once, the LLM learnt count and hardly anything else (docs/demo.md)
    from parrot.demo.data import restrict

    samples = json.loads((data / "stage2.json").read_text(encoding="utf-8"))
    previous, phases = s1, []
    for k, ((qtypes, held), steps) in enumerate(zip(PHASES, phase_steps(s["steps2"]))):
        last = k == len(PHASES) - 1
        target = s2 if last else out / f"stage2-{'-'.join(qtypes)}"
        part = data / "stage2.json" if last else out / f"stage2-{'-'.join(qtypes)}.json"
        if not last:
            part.write_text(json.dumps(restrict(samples, qtypes), ensure_ascii=False), encoding="utf-8")
        hold = ["--mm-projector-lr", "0", *([] if args.no_moe else ["--moe-lr", "0"])] if held else []
        log(f"stage 2, phase {k + 1}/{len(PHASES)}: {', '.join(qtypes)} ({steps} steps"
            f"{'; projector and MoE held' if held else ''})")
        parrot("train", "--stage", "2", "--model", previous, "--data", part, "--image-dir", data / "images",
               "--output", target, "--lr", s["lr2"], "--max-steps", steps, *no_moe, *hold, *common, *watch,
               "--eval-every", s["eval_every"] if last else steps, "--eval-limit", s["eval_limit"])
        previous = target
        phases.append(target)
    final = out / "model"
    parrot("convert", s2, final, "--to", "hf", "--dtype", "float16")
    cfg = json.loads((final / "config.json").read_text())  # the tower is inside (weights + vision_config): name it
    cfg["mm_vision_tower"] = "demo-clip-vit-48"  # instead of this machine's absolute path
    (final / "config.json").write_text(json.dumps(cfg, indent=2))
    plot_losses({"tower (supervised)": out, "stage 1 (captions)": s1, "stage 2 (curriculum)": phases},
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
                                                  "stage2_phases": [p.name for p in phases],
                                                  "seconds": round(time.time() - t0)}, indent=2))
    log(f"all done in {time.time() - t0:.0f} s; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
