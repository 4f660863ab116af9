"""`parrot inspect routing`: the mean MoE routing weights per language, checked against an independent float64
numpy computation of the router from the checkpoint's own tensors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import parrot
from conftest import BACKENDS, random_image, run_parrot_here
from parrot.inference.routing import guess_language, inspect_routing
from parrot.model.image import preprocess
from parrot.storage.safetensors_io import CheckpointFiles

QUESTIONS = {"en": "What colour is the shape?", "cn": "图形是什么颜色的？", "ar": "ما لون الشكل؟"}


@pytest.fixture(scope="module")
def tsvs(tmp_path_factory):
    import base64
    import io

    d = tmp_path_factory.mktemp("routing")
    out = []
    for j, (suffix, q) in enumerate(QUESTIONS.items()):
        rows = []
        for i in range(3):
            buf = io.BytesIO()
            random_image(20 + 7 * i, 30 - 4 * i, seed=10 * j + i).save(buf, format="PNG")
            rows.append({"index": i, "question": f"{q} {i}", "A": "red", "B": "blue", "answer": "A",
                         "category": "colour" if i < 2 else "count",
                         "image": base64.b64encode(buf.getvalue()).decode()})
        p = d / f"probe_{suffix}.tsv"
        pd.DataFrame(rows).to_csv(p, sep="\t", index=False)
        out.append(p)
    return out


def _reference(ckpt_dir, model, tsv_paths) -> dict[str, np.ndarray]:
    """The router written out in float64 numpy from the safetensors tensors (embeddings, gate), with the CLS
    visual token the model's vision tower computes; prompts are the eval prompts' token ids."""
    from parrot.eval.data import read_dataset
    from parrot.eval.prompt import build_prompt, build_query, query_ids
    from parrot.eval.sources import resolve_sources

    files = CheckpointFiles(ckpt_dir)
    emb = files.read("model.embed_tokens.weight").astype(np.float64)
    gate = files.read("model.moe_model.gate.weight").astype(np.float64)
    means = {}
    for path in tsv_paths:
        (src,) = resolve_sources([str(path)])
        ds = read_dataset(src)
        ps = []
        for row, key in zip(ds.rows, ds.keys):
            ids = [i for i in query_ids(model.tokenizer, build_query(build_prompt(row, src.name))) if i >= 0]
            h_t = emb[ids]
            pix = preprocess(ds.image_bytes(key), model.image_settings)
            cls = np.asarray(model.to_numpy(model.image_features(pix)), np.float64)[0, 0]
            s = h_t @ cls / np.sqrt(emb.shape[1])
            w = np.exp(s - s.max())
            a = (w / w.sum()) @ h_t
            g = gate @ a
            p = np.exp(g - g.max())
            ps.append(p / p.sum())
        means[src.name[-2:]] = np.mean(ps, axis=0)
    return means


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_means_match_a_numpy_router(tiny_ckpt, tsvs, backend):
    model = parrot.load(tiny_ckpt, backend=backend, dtype="float32")
    report = inspect_routing(model, tsvs)
    ref = _reference(tiny_ckpt, model, tsvs)
    lang_of = {"en": "en", "cn": "zh", "ar": "ar"}
    assert list(report["languages"]) == ["en", "zh", "ar"]
    for suffix, mean in ref.items():
        got = report["languages"][lang_of[suffix]]
        assert got["questions"] == 3
        np.testing.assert_allclose(got["mean"], mean, atol=2e-5)
        assert abs(sum(got["mean"]) - 1) < 1e-4
    # the tiny model's gate is far from uniform: languages route differently
    assert np.abs(np.array(report["languages"]["en"]["mean"]) - report["languages"]["ar"]["mean"]).max() > 1e-3
    assert set(report["categories"]["en"]) == {"colour", "count"}


def test_cli_writes_json_and_heatmap(tiny_ckpt, tsvs, tmp_path):
    proc = run_parrot_here("inspect", "routing", "--model", str(tiny_ckpt), "--backend", "cpu",
                           *[x for p in tsvs for x in ("--data", str(p))], "--output", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r" / "routing.json").read_text())
    assert report["num_experts"] == 6 and set(report["languages"]) == {"en", "zh", "ar"}
    assert (tmp_path / "r" / "routing.png").read_bytes()[:4] == b"\x89PNG"
    assert "zh" in proc.stdout and "E5" in proc.stdout


def test_llava_json_languages_from_field_or_script(tiny_ckpt, tmp_path):
    random_image(24, 24).save(tmp_path / "a.png")
    samples = [{"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nЧто это?"},
                                                               {"from": "gpt", "value": "x"}]},
               {"id": "2", "image": "a.png", "lang": "tr", "conversations": [{"from": "human", "value": "Bu ne?"}]}]
    (tmp_path / "d.json").write_text(json.dumps(samples, ensure_ascii=False))
    model = parrot.load(tiny_ckpt, backend="cpu")
    report = inspect_routing(model, [tmp_path / "d.json"])
    assert {k: v["questions"] for k, v in report["languages"].items()} == {"tr": 1, "ru": 1}
    assert [guess_language(t) for t in ("你好", "مرحبا", "Olá, está aí?", "Nasılsın?", "hello")] == \
        ["zh", "ar", "pt", "tr", "en"]


def test_a_model_without_moe_is_refused(tiny_ckpt, tsvs, tmp_path):
    import shutil

    d = tmp_path / "nomoe"
    shutil.copytree(tiny_ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["use_moe"] = False
    (d / "config.json").write_text(json.dumps(cfg))
    proc = run_parrot_here("inspect", "routing", "--model", str(d), "--backend", "cpu", "--data", str(tsvs[0]))
    assert proc.returncode != 0 and "no active MoE" in proc.stdout + proc.stderr
