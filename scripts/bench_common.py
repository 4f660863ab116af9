"""Pieces the benchmark scripts share (they import it from their own folder): the machine's description
and the synthetic LLaVA training data."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
from PIL import Image

QUESTIONS = ["What is in the picture?", "Describe the image in detail.", "O que há na imagem?", "Resimde ne var?"]
ANSWER = "There is a red apple on a wooden table next to a cup of tea. The quick brown fox jumps over the lazy dog. "


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_training_data(root: Path, n: int, max_repeats: int, seed: int = 0) -> Path:
    """n samples, 3 in 4 with an image, answers of 1..max_repeats sentences (so batches carry padding)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        convs = [{"from": "human", "value": QUESTIONS[i % 4]},
                 {"from": "gpt", "value": ANSWER * int(rng.integers(1, max_repeats + 1))}]
        s = {"id": str(i), "conversations": convs}
        if i % 4:
            Image.fromarray((rng.random((96 + i, 128, 3)) * 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
            s["image"] = f"{i}.png"
            convs[0]["value"] = "<image>\n" + convs[0]["value"]
        samples.append(s)
    (root / "data.json").write_text(json.dumps(samples, ensure_ascii=False))
    return root / "data.json"


def reference_qwen2(model_dir: Path, data_path: Path, tc, steps: int):
    """The reference side of the torch training benchmarks: our micro-batches (LlavaData + StepPlan, the same
    data and plan as the run) and a transformers Qwen2ForCausalLM with the LLM's config, activation
    checkpointing on as the trainer applies it. Returns (data, plan, model). Imports torch lazily (the MLX
    benchmark scripts share this module)."""
    import torch
    from transformers import Qwen2ForCausalLM

    from parrot.backends.torch_cuda.model import qwen2_config
    from parrot.backends.torch_cuda.train.build import enable_activation_checkpointing
    from parrot.model.config import ParrotConfig
    from parrot.model.tokenizer import Tokenizer
    from parrot.model.tower import resolve_vision_tower
    from parrot.training.data import LlavaData
    from parrot.training.schedule import StepPlan

    cfg = ParrotConfig.from_file(model_dir)
    tower = resolve_vision_tower(cfg, model_dir)
    data = LlavaData(data_path, data_path.parent / "images", Tokenizer.from_dir(model_dir), tower.image,
                     cfg.num_visual_tokens(tower.config), tc.max_length)
    plan = StepPlan(len(data), tc.batch_size, tc.grad_accum, tc.seed, max_steps=steps)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen2_config(cfg)).train()
    enable_activation_checkpointing(model)  # the same helper the trainer applies (model.model: Qwen2Model)
    return data, plan, model


def reference_rates(data, plan, model, params, steps: int) -> list[float]:
    """Tokens/s of each of `steps` optimizer steps of the reference model (AdamW 2e-5, clip 1.0) on random
    token ids shaped like our micro-batches (same lengths, padding masked out of the loss)."""
    import time

    import torch

    opt = torch.optim.AdamW(params, lr=2e-5)
    rates = []
    for s in range(steps):
        t0, tokens = time.perf_counter(), 0
        for mb in plan.micro_batches(s):
            lengths = [data.samples[i].length for i in mb]
            ids = torch.randint(0, model.config.vocab_size, (len(mb), max(lengths)))
            mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
            out = model(input_ids=ids, attention_mask=mask.long(), labels=ids.masked_fill(~mask, -100))
            out.loss.backward()
            tokens += sum(lengths)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(tokens / (time.perf_counter() - t0))
    return rates
