"""The recipe of the demo Parrot, from nothing, with the project's public commands.

    python scripts/make_demo.py --output runs/demo            # full recipe (~15 min on 2 idle cores)
    python scripts/make_demo.py --output runs/quick --quick   # reduced sizes (the end-to-end test)
    python scripts/make_demo.py --output runs/nomoe --no-moe  # the ablation: stage 2 without the MoE

Steps (each prints its wall time; all seeded):
1. data: `parrot.demo.data.build` (shapes images; English captions; six-language instructions; held-out TSVs);
2. tokenizer: byte-level BPE trained with `tokenizers` on the training texts, ChatML special tokens;
3. a new tiny Qwen2 LLM (transformers' Qwen2ForCausalLM at its default init) and a new tiny CLIP vision
   tower (CLIPVisionModel at its default init): nothing is pre-trained, nothing is downloaded;
4. `parrot train --stage 1 --llm --vision-tower` on the captions (projector; with --train-vision the tower);
5. `parrot train --stage 2 --model <stage 1> --train-vision` on the instructions (projector, MoE, LLM, tower);
6. `parrot convert` to the final float16 official layout (the shipped model) and `parrot eval` on the
   held-out TSVs on cpu (and mlx when installed);
7. loss curves (matplotlib) from both stages' metrics.jsonl into OUTPUT/loss.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL = dict(stage1=3000, stage2=24000, heldout=240, steps1=100, steps2=1500, batch=16, vocab=1400, lr2=2e-3,
            hidden=96, layers=3, heads=4, kv_heads=2, intermediate=256, moe_intermediate=96,
            vision_hidden=64, vision_layers=3, vision_heads=4, image_size=48, patch=8)
QUICK = dict(FULL, stage1=300, stage2=3000, heldout=24, steps1=20, steps2=300, vocab=900, hidden=96,
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


def plot_losses(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.5))
    for ax, (name, run) in zip(axes, runs.items()):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
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
        new_tower(tower, s, args.seed + 1)
    common = ["--backend", "cpu", "--seed", str(args.seed), "--num-workers", "1", "--no-grad-checkpoint",
              "--batch-size", str(s["batch"]), "--grad-accum", "1", "--save-every", "100000", "--warmup-ratio", "0.05"]
    s1, s2 = out / "stage1", out / "stage2"
    parrot("train", "--stage", "1", "--llm", llm, "--vision-tower", tower, "--data", data / "stage1.json",
           "--image-dir", data / "images", "--output", s1, "--lr", "1e-3", "--max-steps", s["steps1"], "--train-vision",
           "--moe-intermediate-size", s["moe_intermediate"], *common)
    parrot("train", "--stage", "2", "--model", s1, "--data", data / "stage2.json",
           "--image-dir", data / "images", "--output", s2,
           "--lr", s["lr2"], "--max-steps", s["steps2"], "--train-vision", *(["--no-moe"] if args.no_moe else []),
           *common)
    final = out / "model"
    parrot("convert", s2, final, "--to", "hf", "--dtype", "float16")
    plot_losses({"stage 1 (captions)": s1, "stage 2 (instructions)": s2}, out / "loss.png")
    tsvs = sorted((data / "heldout").glob("demo_*.tsv"))
    results = {}
    for backend in args.backends.split(","):
        if backend == "mlx":
            try:
                import mlx.core  # noqa: F401
            except ImportError:
                log("mlx not installed: skipping its evaluation")
                continue
        parrot("eval", *tsvs, "--model", final, "--backend", backend, "--output", out / f"eval-{backend}",
               "--batch-size", "16", "--max-tokens", "8", "--quiet")
        results[backend] = json.loads((out / f"eval-{backend}" / "summary.json").read_text())
    (out / "results.json").write_text(json.dumps({"settings": s, "moe": not args.no_moe, "eval": results,
                                                  "seconds": round(time.time() - t0)}, indent=2))
    log(f"all done in {time.time() - t0:.0f} s; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
