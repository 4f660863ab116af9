"""Where a training run starts: a Parrot checkpoint (`--model`, either layout), or a new Parrot
around a plain Qwen2 LLM and a CLIP tower (`--llm --vision-tower`). Backend-agnostic (numpy):
both trainers build their model from a `ModelSource`.

A new model's projector and MoE are listed in `new_modules`: the backend initializes them at its
default init (the official code uses torch's). Stage 1 bypasses the MoE (`use_moe: false`).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import registry
from ..errors import ParrotError
from ..model.checkpoint import Checkpoint
from ..model.config import ParrotConfig
from ..model.layout import OFFICIAL_VISION, mlx_to_official_array, mlx_to_official_key, tower_to_official_key
from ..model.manifest import Manifest, build_manifest, validate
from ..model.tokenizer import Tokenizer, copy_tokenizer_files
from ..model.tower import ResolvedTower, resolve_vision_tower
from ..storage.hub import download, is_hub_id, resolve_model_path
from ..storage.safetensors_io import CheckpointFiles, remove_weight_files
from .config import TrainConfig

Weights = Callable[[], Iterator[tuple[str, np.ndarray]]]


@dataclass
class ModelSource:
    config: ParrotConfig
    tower: ResolvedTower
    tokenizer_dir: Path
    weights: Weights  # official-name float tensors the model loads
    unused: Weights  # tensors the model does not hold but the export carries (CLIP's unused last layer)
    new_modules: list[str] = field(default_factory=list)  # "mm_projector", "moe_model": fresh default init
    description: str = ""
    checkpoint: Checkpoint | None = None  # the opened --model (the MLX trainer loads quantized bases from it)


def open_source(tc: TrainConfig) -> ModelSource:
    src = _from_checkpoint(tc) if tc.model is not None else _from_llm(tc)
    Tokenizer.from_dir(src.tokenizer_dir)  # fails early, with a clear message, when the tokenizer is unusable
    src.config.use_moe = tc.use_moe
    return src


# ---------------------------------------------------------------- sources
def _from_checkpoint(tc: TrainConfig) -> ModelSource:
    ckpt = Checkpoint.open(resolve_model_path(tc.model), tc.vision_tower)
    if ckpt.quantized and not (registry.get(tc.backend).qlora == "quantized_base" and tc.lora):
        where = ("fully (only LoRA adapters train on a quantized base: --lora)"
                 if registry.get(tc.backend).qlora == "quantized_base" else
                 f"on --backend {tc.backend} (QLoRA there: --lora --quantize 4 on a float base)")
        raise ParrotError(f"{ckpt.path}: quantized MLX weights cannot be trained {where}; dequantize them with "
                          "`parrot convert --to hf`")
    cfg = ckpt.config
    new = []
    if not cfg.has_moe:  # a Parrot without MoE weights: the official code builds the MoE at default init
        cfg.num_experts, cfg.moe_hidden_size = tc.num_experts, cfg.hidden_size
        cfg.moe_intermediate_size, cfg.moe_top_k = tc.moe_intermediate_size, tc.num_experts
        cfg.moe_weight = tc.moe_weight
        new.append("moe_model")
        if tc.lora and tc.use_moe:
            raise ParrotError(f"{ckpt.path} has no MoE weights: an adapter applies to a base that holds them. "
                              "Train stage 2 fully first, or add --no-moe.")

    def unused() -> Iterator[tuple[str, np.ndarray]]:
        for k in ckpt.files.keys():
            ok = mlx_to_official_key(k) if ckpt.layout == "mlx" else k
            if ok in ckpt.manifest.optional and ok not in ckpt.manifest.required:
                a = ckpt.files.read(k)
                yield ok, (mlx_to_official_array(ok, a) if ckpt.layout == "mlx" else a)
        for ok, a in ckpt.iter_tower(used_only=False):
            if ok not in ckpt.manifest.required:
                yield ok, a

    return ModelSource(cfg, ckpt.tower, ckpt.path, lambda: ckpt.iter_official(used_only=True), unused, new,
                       f"Parrot checkpoint {ckpt.path}", checkpoint=ckpt)


def _from_llm(tc: TrainConfig) -> ModelSource:
    llm = Path(tc.llm)
    if not (llm / "config.json").is_file():
        raise ParrotError(f"--llm {llm}: no config.json (expected a Qwen2 LLM directory, e.g. Qwen1.5-7B-Chat)")
    try:
        d = json.loads((llm / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ParrotError(f"{llm / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("model_type") != "qwen2":
        kind = d.get("model_type") if isinstance(d, dict) else None
        raise ParrotError(f"--llm {llm}: model_type is {kind!r}; Parrot is built on a Qwen2 LLM (model_type 'qwen2')")
    d.update(
        model_type="parrot_qwen2", architectures=["ParrotQwen2ForCausalLM"], mm_vision_tower=str(tc.vision_tower),
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="cls_patch",
        image_aspect_ratio="pad", mm_patch_merge_type="flat", use_mm_proj=True, num_experts=tc.num_experts,
        moe_hidden_size=d.get("hidden_size"), moe_intermediate_size=tc.moe_intermediate_size,
        moe_top_k=tc.num_experts, moe_weight=tc.moe_weight, use_moe_residual=True,
    )
    d.pop("auto_map", None)
    cfg = ParrotConfig.from_dict(d, source=str(llm / "config.json"))
    tower = resolve_vision_tower(cfg, None, tc.vision_tower)
    if tower.directory is None and is_hub_id(str(tc.vision_tower)):
        tower = resolve_vision_tower(cfg, None, download(str(tc.vision_tower), ["*.json", "*.safetensors"]))
    if tower.directory is None:
        raise ParrotError(f"--vision-tower {tc.vision_tower}: a new model needs the tower's weights; "
                          "pass its directory")
    cfg.mm_hidden_size = tower.config.hidden_size
    cfg.vision_config = tower.config
    if not is_hub_id(str(tc.vision_tower)):
        cfg.mm_vision_tower = str(tower.directory.resolve())
    manifest = build_manifest(cfg, tower.config)
    llm_files = CheckpointFiles(llm)
    validate(llm_files.shapes(), _part(manifest, llm=True), f"--llm {llm}")
    tower_files = CheckpointFiles(tower.directory)
    tower_shapes = {tower_to_official_key(k): s for k, s in tower_files.shapes().items() if tower_to_official_key(k)}
    validate(tower_shapes, _part(manifest, llm=False), f"--vision-tower {tower.directory}")

    def weights() -> Iterator[tuple[str, np.ndarray]]:
        for k in llm_files.keys():
            if k in manifest.required:
                yield k, llm_files.read(k)
        for k in tower_files.keys():
            ok = tower_to_official_key(k)
            if ok in manifest.required:
                yield ok, tower_files.read(k)

    def unused() -> Iterator[tuple[str, np.ndarray]]:
        for k in tower_files.keys():
            ok = tower_to_official_key(k)
            if ok in manifest.optional and ok not in manifest.required:
                yield ok, tower_files.read(k)

    return ModelSource(cfg, tower, llm, weights, unused, ["mm_projector", "moe_model"],
                       f"new Parrot from LLM {llm} and vision tower {tower.source}")


def _part(m: Manifest, llm: bool) -> Manifest:
    """The LLM part (embeddings, layers, norm, lm_head) or the vision part of a manifest."""
    def keep(k: str) -> bool:
        is_vision = k.startswith(OFFICIAL_VISION)
        is_llm = not is_vision and not k.startswith(("model.mm_projector.", "model.moe_model."))
        return is_llm if llm else is_vision
    return Manifest({k: s for k, s in m.required.items() if keep(k)}, {k: s for k, s in m.optional.items() if keep(k)})


def write_model_description(src: ModelSource, directory: Path, dtype: str, max_length: int) -> None:
    """Everything of a model directory but the weights: config.json (official layout plus the resolved
    vision_config), tokenizer files, preprocessor settings. Both backends' exports write it; sharded
    checkpoints carry it in `model/`, so `parrot convert` can turn them into a model directory."""
    directory.mkdir(parents=True, exist_ok=True)
    copy_tokenizer_files(src.tokenizer_dir, directory)
    src.tower.image.save(directory)
    cfg = copy.deepcopy(src.config)  # the run goes on with the source's config untouched
    cfg.torch_dtype = dtype
    cfg.vision_config = src.tower.config
    cfg.quantization = None
    if src.tower.directory is not None and not is_hub_id(str(cfg.mm_vision_tower)):
        cfg.mm_vision_tower = str(src.tower.directory.resolve())  # a relative tower path would not resolve
    cfg.extra.update(tokenizer_model_max_length=max_length, use_cache=True)
    cfg.save(directory, layout="mlx")  # official layout + the resolved vision_config (official readers ignore it)


def move_model_into(tmp: Path, out: Path) -> None:
    """Moves an exported model from `tmp` into `out`, config.json last: a directory with a config.json is
    always complete."""
    (out / "config.json").unlink(missing_ok=True)
    remove_weight_files(out)
    for p in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
        os.replace(p, out / p.name)
