"""LoRA on torch (PEFT) and on MLX (mlx-lm's LoRALinear) is one run: the same initial adapters (drawn in
parrot_core from the seed), the same losses step by step, adapters that load on both backends and in
PEFT itself, a frozen base that stays bit-identical, and exact resume after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from train_helpers import read_losses, write_dataset

from conftest import requires_mlx, requires_torch, run_parrot
from parrot.model.layout import mlx_to_official_array, mlx_to_official_key
from parrot.storage.safetensors_io import CheckpointFiles, SafetensorsFile
from parrot.training.config import TrainConfig

pytestmark = [requires_mlx, requires_torch]
PROMPT = "What is in the picture?"
STEPS = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n=6)


def _settings(model, data, image_dir, **kw):
    s = dict(stage=2, data=str(data), image_dir=str(image_dir), model=str(model), num_workers=0, lora=True,
             batch_size=2, grad_accum=1, lr=2e-3, warmup_ratio=0.0, max_steps=STEPS, lora_dropout=0.0)
    s.update(kw)
    return s


def _train_capturing(output, backend, **settings):
    """Trains and returns (output, the trained in-memory model) (the engine's model, kept at close)."""
    from parrot.backends.mlx.train.loop import MLXEngine
    from parrot.backends.torch_cuda.train.loop import TorchEngine
    from parrot.training import train

    kept = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TorchEngine, "close", lambda self: kept.setdefault("model", self.strategy.model))
        mp.setattr(MLXEngine, "close", lambda self: kept.setdefault("model", self.model))
        out = train(TrainConfig(output=str(output), backend=backend, **settings), progress=False)
    return out, kept["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt, dataset):
    root = tmp_path_factory.mktemp("lora-runs")
    return {b: _train_capturing(root / b, b, **_settings(tiny_ckpt, *dataset)) for b in ("cpu", "mlx")}


def _logits(model, image=None):
    ids = model.encode_prompt(PROMPT, has_image=image is not None)
    return model.logits(ids, None if image is None else model.preprocess(image))


def test_init_is_drawn_once_from_the_seed_in_numpy():
    from parrot.training.adapter import init_lora

    shapes = {"a.q_proj": (64, 32), "b.down_proj": (128, 64)}
    one, again = init_lora(shapes, 8, 42), init_lora(dict(reversed(shapes.items())), 8, 42)
    assert all(np.array_equal(one[k], again[k]) for k in one)  # independent of the order
    a = one["b.down_proj.lora_a"]
    assert a.shape == (128, 8) and a.dtype == np.float32 and not np.any(one["b.down_proj.lora_b"])
    bound = 1 / np.sqrt(128)  # mlx-lm's LoRALinear / PEFT's kaiming_uniform(a=sqrt(5)) bound
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound and abs(a.mean()) < 0.1 * bound
    assert not np.array_equal(a, init_lora(shapes, 8, 43)["b.down_proj.lora_a"])


def test_torch_and_mlx_lora_losses_agree_step_by_step(runs):
    torch_losses, mlx_losses = (np.array(read_losses(runs[b][0])) for b in ("cpu", "mlx"))
    assert len(torch_losses) == STEPS and torch_losses[-1] < torch_losses[0]
    np.testing.assert_allclose(torch_losses, mlx_losses, rtol=1e-4, atol=0)


def test_both_backends_start_from_the_same_adapter(tiny_ckpt, dataset, tmp_path):
    settings = _settings(tiny_ckpt, *dataset, lr=0.0, max_steps=1)
    a = _train_capturing(tmp_path / "cpu", "cpu", **settings)[0]
    b = _train_capturing(tmp_path / "mlx", "mlx", **settings)[0]
    pa = SafetensorsFile(a / "adapter_model.safetensors").read_all()
    mb = SafetensorsFile(b / "adapters.safetensors").read_all()
    m = "language_model.model.layers.1.self_attn.v_proj"
    assert np.array_equal(pa["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].T, mb[f"{m}.lora_a"])
    assert not np.any(mb[f"{m}.lora_b"]) and np.abs(mb[f"{m}.lora_a"]).max() > 0


def test_trained_adapters_give_the_same_logits_on_both_backends(runs, tiny_ckpt, dataset):
    import parrot

    image = dataset[1] / "img2.png"
    got = {(run, b): _logits(parrot.load(tiny_ckpt, backend=b, adapter=runs[run][0]), image)
           for run in ("cpu", "mlx") for b in ("cpu", "mlx")}
    ref = got["mlx", "mlx"]
    scale = np.abs(ref).max()
    for k, v in got.items():
        assert np.abs(v - ref).max() < 1e-4 * scale, k
    assert np.abs(_logits(parrot.load(tiny_ckpt, backend="cpu"), image) - ref).max() > 1e-2  # the adapter matters


def _torch_base(model) -> dict[str, np.ndarray]:
    return {n.replace(".base_layer.", "."): p.detach().numpy() for n, p in model.named_parameters()
            if ".lora_" not in n}


def _mlx_base(model) -> dict[str, np.ndarray]:
    from mlx.utils import tree_flatten

    out = {}
    for k, v in tree_flatten(model.parameters()):
        if k.endswith((".lora_a", ".lora_b")):
            continue
        ok = mlx_to_official_key(k.replace(".linear.", "."))
        out[ok] = mlx_to_official_array(ok, np.array(v))
    return out


@pytest.mark.parametrize("lora_only", [False, True], ids=["with-projector-moe", "adapters-only"])
def test_lora_leaves_every_base_tensor_bit_identical(runs, tiny_ckpt, dataset, tmp_path, lora_only):
    base = CheckpointFiles(tiny_ckpt)
    full = ("model.mm_projector.", "model.moe_model.")
    for backend in ("cpu", "mlx"):
        if lora_only:
            out, model = _train_capturing(tmp_path / backend, backend,
                                          **_settings(tiny_ckpt, *dataset, lora_only=True, max_steps=2))
        else:
            out, model = runs[backend]
        tensors = _torch_base(model) if backend == "cpu" else _mlx_base(model)
        assert len(tensors) > 40
        for k, v in tensors.items():
            if k.startswith(full) and not lora_only:
                assert not np.array_equal(v, base.read(k)), (backend, k)  # trained fully
            else:
                assert np.array_equal(v, base.read(k)), (backend, k)
        saved = CheckpointFiles(out / "checkpoints" / f"step-{(2 if lora_only else STEPS):08d}").keys()
        assert any(k.startswith(("mm_projector.", "model.mm_projector.")) for k in saved) != lora_only


@pytest.mark.slow  # a real SIGKILL / browser end to end: make test runs it, make test-quick skips it
def test_killed_torch_lora_run_resumes_to_the_uninterrupted_losses(tmp_path, tiny_ckpt, dataset):
    from parrot.training import train

    settings = _settings(tiny_ckpt, *dataset, max_steps=12, save_every=2, batch_size=1, lora_dropout=0.1)  # RNG too
    ref = train(TrainConfig(output=str(tmp_path / "ref"), backend="cpu", **settings), progress=False)
    out = tmp_path / "killed"
    flags = {k: v for k, v in settings.items() if k not in ("lora", "stage")}
    args = ["train", "--backend", "cpu", "--stage", "2", "--lora", "--output", str(out),
            *(a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v)))]
    proc = subprocess.Popen([sys.executable, "-m", "parrot.cli.main", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-00000004" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter_config.json").exists()
    again = run_parrot(*args, "--resume")
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout
    assert read_losses(out) == read_losses(ref)
    a = SafetensorsFile(ref / "adapter_model.safetensors").read_all()
    b = SafetensorsFile(out / "adapter_model.safetensors").read_all()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_peft_round_trip_is_bit_identical(runs, tmp_path):
    from parrot.convert.adapters import convert_adapter

    ours = runs["mlx"][0]
    p = run_parrot("convert", ours, tmp_path / "peft", "--adapter-format", "peft")
    assert p.returncode == 0, p.stderr
    assert {f.name for f in (tmp_path / "peft").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    convert_adapter(tmp_path / "peft", tmp_path / "back", "mlx-lm")
    assert (tmp_path / "back" / "adapters.safetensors").read_bytes() == (ours / "adapters.safetensors").read_bytes()
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text()) == \
        json.loads((ours / "adapter_config.json").read_text())
    # and the other way: a torch run's PEFT adapter -> mlx-lm -> PEFT
    convert_adapter(runs["cpu"][0], tmp_path / "mlxlm", "mlx-lm")
    convert_adapter(tmp_path / "mlxlm", tmp_path / "peft2", "peft")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "peft2" / name).read_bytes() == (runs["cpu"][0] / name).read_bytes(), name


def test_peft_loads_our_adapter_and_reads_our_config(runs):
    from peft import LoraConfig

    cfg = LoraConfig.from_pretrained(str(runs["cpu"][0]))
    assert cfg.r == 8 and cfg.lora_alpha == 160.0 and cfg.lora_dropout == 0.0  # scale 20 = alpha / r
    assert "model.layers.0.self_attn.q_proj" in cfg.target_modules and len(cfg.target_modules) == 14
    assert sorted(cfg.modules_to_save) == ["model.mm_projector", "model.moe_model"]


def test_peft_model_on_transformers_qwen2_gives_our_logits(tiny_ckpt, dataset, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import Qwen2ForCausalLM

    import parrot
    from parrot.backends.torch_cuda.model import qwen2_config

    out, _ = _train_capturing(tmp_path / "run", "mlx", **_settings(tiny_ckpt, *dataset, lora_only=True,
                                                                    max_steps=3, lora_targets=["attention", "mlp"]))
    run_parrot("convert", out, tmp_path / "peft", "--adapter-format", "peft")
    ours = parrot.load(tiny_ckpt, backend="cpu", adapter=tmp_path / "peft")
    base = CheckpointFiles(tiny_ckpt)
    qwen = Qwen2ForCausalLM(qwen2_config(ours.config)).eval()
    state = {k: torch.from_numpy(base.read(k)) for k in base.keys() if k.startswith(("model.layers.", "model.norm",
                                                                                     "model.embed", "lm_head"))}
    missing, unexpected = qwen.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), missing
    peft_model = PeftModel.from_pretrained(qwen, str(tmp_path / "peft")).eval()
    ids = ours.encode_prompt(PROMPT, has_image=False)
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    mine = _logits(ours)
    assert np.abs(theirs - mine).max() < 1e-4
    assert np.abs(_logits(parrot.load(tiny_ckpt, backend="mlx", adapter=out)) - theirs).max() < 1e-4
    assert np.abs(_logits(parrot.load(tiny_ckpt, backend="cpu")) - theirs).max() > 1e-3  # the adapter matters


@pytest.mark.parametrize("run, backend", [("cpu", "mlx"), ("mlx", "cpu")])
def test_chat_with_an_adapter_of_the_other_backend(runs, tiny_ckpt, dataset, run, backend):
    import parrot
    from conftest import run_parrot_here
    from parrot.cli.repl import printable

    image = dataset[1] / "img1.png"
    p = run_parrot_here("chat", "--backend", backend, "--model", tiny_ckpt, str(image), "--adapter", runs[run][0],
                        "--prompt", PROMPT, "--max-tokens", "6")
    assert p.returncode == 0, p.stderr
    want = parrot.load(tiny_ckpt, backend=backend, adapter=runs[run][0]).generate(PROMPT, image, max_tokens=6).text
    plain = parrot.load(tiny_ckpt, backend=backend).generate(PROMPT, image, max_tokens=6).text
    assert p.stdout == printable(want) + "\n"
    assert want != plain  # the adapter is applied


@pytest.mark.parametrize("run", ["cpu", "mlx"])
def test_fused_adapter_of_either_format_gives_the_adapted_logits(runs, tiny_ckpt, dataset, tmp_path, run):
    import parrot

    p = run_parrot("convert", tiny_ckpt, tmp_path / "fused", "--to", "hf", "--fuse-adapter", runs[run][0])
    assert p.returncode == 0, p.stderr
    image = dataset[1] / "img0.png"
    want = _logits(parrot.load(tiny_ckpt, backend="mlx", adapter=runs[run][0]), image)
    for backend in ("cpu", "mlx"):
        assert np.abs(_logits(parrot.load(tmp_path / "fused", backend=backend), image) - want).max() < 1e-4
    fused = CheckpointFiles(tmp_path / "fused")
    trained = CheckpointFiles(runs[run][0] / "checkpoints" / f"step-{STEPS:08d}")
    key = "model.mm_projector.0.weight"  # the fully trained projector replaces the base's
    assert np.array_equal(fused.read(key), trained.read(key if run == "cpu" else "mm_projector.0.weight"))


def test_odd_peft_configs_are_refused_cleanly(tmp_path):
    import random

    from parrot.errors import ParrotError
    from parrot.storage.safetensors_io import save_file
    from parrot.training.adapter import read_adapter

    q = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{q}.lora_A.weight": np.ones((2, 8), np.float32), f"{q}.lora_B.weight": np.ones((8, 2), np.float32)},
              tmp_path / "adapter_model.safetensors")
    good = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": [q[17:]]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(good))
    a = read_adapter(tmp_path)
    assert a.format == "peft" and a.scale == 2.0 and a.modules == ["language_model.model.layers.0.self_attn.q_proj"]
    assert a.weights["language_model.model.layers.0.self_attn.q_proj.lora_a"].shape == (8, 2)  # A = lora_A^T
    odd = [None, True, -1, 0, 1.5, float("nan"), "x", [], {}, 10**30, [1], {"a": 1}]
    keys = [*good, "use_rslora", "use_dora", "bias", "rank_pattern", "fan_in_fan_out"]
    rng, refused = random.Random(0), 0
    for _ in range(300):
        cfg = dict(good)
        for _ in range(rng.randint(1, 3)):
            cfg[rng.choice(keys)] = rng.choice(odd)
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
        try:
            read_adapter(tmp_path)
        except ParrotError:
            refused += 1
    assert refused > 150  # the rest are harmless values (e.g. use_rslora None); nothing else escapes


def test_adapter_format_conversion_errors_are_clean(runs, tiny_ckpt, tmp_path):
    from conftest import assert_clean_failure, run_parrot_here

    ours = runs["mlx"][0]
    p = run_parrot_here("convert", ours, tmp_path / "a", "--adapter-format", "peft", "-q", "4")
    assert_clean_failure(p, "--adapter-format", "no other option")
    p = run_parrot_here("convert", tiny_ckpt, tmp_path / "b", "--adapter-format", "peft")
    assert_clean_failure(p, "adapter_config.json")
    p = run_parrot_here("convert", ours, ours / "inside", "--adapter-format", "peft")
    assert_clean_failure(p, "must not be the adapter")
    assert not any((tmp_path / n).exists() for n in "ab") and not (ours / "inside").exists()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("x")  # an existing output that is not ours is never replaced
    p = run_parrot_here("convert", ours, tmp_path / "c", "--adapter-format", "peft", "--force")
    assert p.returncode != 0 and (tmp_path / "c" / "keep.txt").read_text() == "x"
