"""`parrot inspect routing`: the MoE's mean routing weights per language (and per category), as in the
paper's analysis of language-specific experts.

For each question (a VLMEvalKit TSV row, or a LLaVA JSON sample's first human turn) the routing vector of
official inference is computed, backend-agnostically, from the loaded model's word embeddings and CLS
visual token and the checkpoint's gate weight, in float64:

    a = softmax(h_cls @ H_t^T / sqrt(C)) @ H_t      (H_t: every text token of the prompt)
    p = softmax(gate @ a)                            [num_experts]

Languages: a TSV's from its name (VLMEvalKit's suffix: _cn = zh, _pt, _ar, _ru, _tr, else en); a JSON
sample's from its "lang" field, else guessed from the question's script.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import IMAGE_TOKEN_INDEX
from ..errors import ParrotError

GATE = "model.moe_model.gate.weight"
SUFFIX_LANG = {"_cn": "zh", "_pt": "pt", "_ar": "ar", "_ru": "ru", "_tr": "tr", "_en": "en"}
_SCRIPTS = [("zh", re.compile("[\u4e00-\u9fff]")), ("ar", re.compile("[\u0600-\u06ff]")),
            ("ru", re.compile("[\u0400-\u04ff]")), ("tr", re.compile("[ğışİĞŞ]")),
            ("pt", re.compile("[ãõçáéêíóôúàÃÕÇ]"))]


def guess_language(text: str) -> str:
    for lang, pattern in _SCRIPTS:
        if pattern.search(text):
            return lang
    return "en"


def gate_weight(model) -> np.ndarray:
    """The gate [E, C] as float64, read from the checkpoint (either layout)."""
    ckpt = model.checkpoint
    if not model.config.moe_active:
        raise ParrotError(f"{model.path}: this model has no active MoE (use_moe is false or its weights are "
                          "missing): there is no routing to inspect")
    from ..model.layout import official_to_mlx_key

    key = GATE if ckpt.layout != "mlx" else official_to_mlx_key(GATE)
    if key not in set(ckpt.files.keys()):
        raise ParrotError(f"{model.path}: no {key} in the weights")
    w = np.asarray(ckpt.files.read(key))
    if w.dtype.kind != "f" and w.dtype.name != "bfloat16":
        raise ParrotError(f"{model.path}: the MoE gate is quantized; inspect the float model "
                          "(`parrot convert --to hf`)")
    return w.astype(np.float64)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def routing_vector(model, gate: np.ndarray, input_ids: list[int], pixels: np.ndarray) -> np.ndarray:
    text = [i for i in input_ids if i != IMAGE_TOKEN_INDEX]
    h_t = np.asarray(model.to_numpy(model.embed_tokens(text)), np.float64)[0]  # [T, C]
    h_cls = np.asarray(model.to_numpy(model.image_features(pixels)), np.float64)[0, 0]  # [C]
    a = _softmax(h_t @ h_cls / np.sqrt(h_t.shape[-1])) @ h_t
    return _softmax(gate @ a)


def questions(model, data: Path, limit: int | None = None, image_dir: Path | None = None) -> list[dict[str, Any]]:
    """[{lang, category, ids, image}] for each question of a TSV or LLaVA JSON file."""
    from ..eval.prompt import build_prompt, build_query, query_ids

    out = []
    if data.suffix.lower() == ".json":
        from ..training.data import read_llava_json

        root = image_dir or data.parent
        for s in read_llava_json(data)[:limit]:
            human = next((t["value"] for t in s.get("conversations", []) if t.get("from") == "human"), None)
            if human is None or "image" not in s:
                continue
            q = human.replace("<image>", "").strip()
            out.append({"lang": s.get("lang") or guess_language(q), "category": s.get("category", "all"),
                        "ids": model.encode_prompt(q, has_image=True), "image": root / s["image"]})
        return out
    from ..eval.data import read_dataset
    from ..eval.sources import resolve_sources

    (src,) = resolve_sources([str(data)])
    ds = read_dataset(src)
    lang = SUFFIX_LANG.get(src.name[-3:].lower(), "en")
    for row, key in list(zip(ds.rows, ds.keys))[:limit]:
        prompt = build_prompt(row, src.name)
        out.append({"lang": lang, "category": str(row.get("category", "all")),
                    "ids": query_ids(model.tokenizer, build_query(prompt)), "image": ds.image_bytes(key)})
    return out


def inspect_routing(model, files: list[Path], limit: int | None = None, progress=None,
                    image_dir: Path | None = None) -> dict[str, Any]:
    """The report `parrot inspect routing` prints and writes (see the module doc)."""
    gate = gate_weight(model)
    per: dict[str, list[np.ndarray]] = {}
    per_cat: dict[tuple[str, str], list[np.ndarray]] = {}
    items = [q for f in files for q in questions(model, Path(f), limit, image_dir)]
    if not items:
        raise ParrotError("no question with an image in " + ", ".join(map(str, files)))
    for q in (progress(items) if progress else items):
        p = routing_vector(model, gate, q["ids"], model.preprocess(q["image"]))
        per.setdefault(q["lang"], []).append(p)
        per_cat.setdefault((q["lang"], q["category"]), []).append(p)
    order = [x for x in ("en", "zh", "pt", "ar", "tr", "ru") if x in per] + sorted(set(per) - {"en", "zh", "pt", "ar",
                                                                                             "tr", "ru"})
    return {
        "model": str(model.path), "num_experts": int(gate.shape[0]), "data": [str(f) for f in files],
        "languages": {lang: {"questions": len(per[lang]), "mean": np.mean(per[lang], 0).round(6).tolist()}
                      for lang in order},
        "categories": {lang: {c: np.mean(v, 0).round(6).tolist() for (lg, c), v in sorted(per_cat.items())
                              if lg == lang} for lang in order},
    }


def write_report(report: dict[str, Any], output: Path) -> list[Path]:
    """routing.json, and routing.png (a heatmap) when matplotlib is installed; returns the files written."""
    from ..storage.fsutil import atomic_output_file

    output.mkdir(parents=True, exist_ok=True)
    written = [output / "routing.json"]
    with atomic_output_file(written[0], encoding="utf-8") as f:
        f.write(json.dumps(report, indent=2, ensure_ascii=False))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    langs = list(report["languages"])
    m = np.array([report["languages"][lang]["mean"] for lang in langs])
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * m.shape[1], 0.9 + 0.5 * len(langs)))
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=max(float(m.max()), 1e-9), aspect="auto")
    ax.set_xticks(range(m.shape[1]), [f"E{i}" for i in range(m.shape[1])])
    ax.set_yticks(range(len(langs)), langs)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if m[i, j] < 0.6 * m.max() else "black")
    ax.set_title("mean MoE routing weight per language")
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    png = output / "routing.png"
    with atomic_output_file(png, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return [*written, png]
