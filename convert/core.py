"""`parrot convert` as a library function: a Parrot directory (or hub id) in, a self-contained
official-layout ("hf") or MLX-layout directory out, optionally quantized.

Streaming: tensors are read, translated (parrot.model.layout), cast, quantized and written one at a time
into a planned sharded writer, so memory holds about one tensor. Output goes to a temporary
directory renamed into place at the end; any error leaves no destination behind. Every tensor the
source holds is carried (CLIP's unused last layer too), so official -> MLX -> official is bit-exact.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parrot.errors import ParrotError
from parrot.model.config import DTYPES, KNOWN_VISION_TOWERS
from parrot.model.layout import official_to_mlx_array, official_to_mlx_key, official_to_mlx_shape
from parrot.model.tokenizer import CHATML_TEMPLATE, Tokenizer, copy_tokenizer_files
from parrot.model.tower import find_tower_dir
from parrot.storage.fsutil import atomic_output_dir, check_output, check_replaceable
from parrot.storage.hub import download, is_hub_id, resolve_model_path
from parrot.storage.safetensors_io import NAME_TO_NP, ShardedWriter, TensorSpec
from parrot.training.adapter import fit_base, read_adapter

from .detect import open_source
from .quantize import QUANTIZE_EXPERTS_DEFAULT, QuantSpec, module_pattern, quantization_record, quantize
from .sources import Source, SourceTensor, has_vision_weights

TARGETS = ("mlx", "hf")
TOWER_PATTERNS = ["config.json", "preprocessor_config.json", "*.safetensors"]
_FLOATS = {*NAME_TO_NP.values(), np.dtype(np.float64)}
_FLOAT_BY_POLICY = {  # official prefix -> (MLX module, why it stays float)
    "model.vision_tower.": ("vision_tower", "vision tower stays float"),
    "model.mm_projector.": ("mm_projector", "projector stays float"),
    "model.moe_model.gate.": ("moe_model.gate", "MoE router stays float"),
}


@dataclass
class ConversionResult:
    path: Path
    target: str  # "mlx" | "hf"
    dtype: str  # float dtype of the non-quantized tensors (config torch_dtype)
    quantization: dict | None  # the config.json entry, None for float output
    source_bytes: int
    written_bytes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Item:
    source: SourceTensor
    dtype: np.dtype  # cast target
    specs: list[TensorSpec]  # 1 output, or 3 (weight, scales, biases) when quantized


def _warn(msg: str, notes: list[str]) -> None:
    notes.append(msg)
    warnings.warn(msg, UserWarning, stacklevel=3)


def _tower_argument(vision_tower, src: Path):
    """A hub id given as --vision-tower is downloaded when needed: when SRC lacks the tower weights,
    or when it is neither cached nor a built-in tower config."""
    if vision_tower is None or Path(str(vision_tower)).exists() or not is_hub_id(str(vision_tower)):
        return vision_tower
    name = str(vision_tower)
    need_weights = not has_vision_weights(src)
    cached = find_tower_dir(name, None)
    if cached is not None and (not need_weights or any(cached.glob("*.safetensors"))):
        return cached
    if need_weights or name not in KNOWN_VISION_TOWERS:
        return download(name, allow_patterns=TOWER_PATTERNS)
    return name


def _plan(source: Source, to: str, dtype: np.dtype | None, spec: QuantSpec | None):
    items: list[_Item] = []
    quantized: list[str] = []
    kept_float: dict[str, str] = {}
    for t in source.tensors:
        out_dt = dtype if dtype is not None and t.dtype in _FLOATS else t.dtype
        key = official_to_mlx_key(t.key) if to == "mlx" else t.key
        shape = official_to_mlx_shape(t.key, t.shape) if to == "mlx" else tuple(t.shape)
        if spec is not None and spec.candidate(t.key):
            if spec.divisible(t.shape):
                qshape, sshape = spec.quantized_shapes(t.shape)
                base = key.removesuffix(".weight")
                items.append(_Item(t, out_dt, [TensorSpec(key, np.dtype(np.uint32), qshape),
                                               TensorSpec(f"{base}.scales", out_dt, sshape),
                                               TensorSpec(f"{base}.biases", out_dt, sshape)]))
                quantized.append(module_pattern(t.key))
                continue
            kept_float[module_pattern(t.key)] = (
                f"input size {t.shape[-1]} is not divisible by the group size {spec.group_size}"
            )
        elif spec is not None and t.key.endswith(".weight") and len(t.shape) == 2:
            for prefix, (module, why) in _FLOAT_BY_POLICY.items():
                if t.key.startswith(prefix):
                    kept_float[module] = why
            if ".experts." in t.key and not spec.experts:
                kept_float["moe_model.experts"] = "experts kept float (--no-quantize-experts)"
            if t.key in ("model.embed_tokens.weight", "lm_head.weight") and not spec.embeddings:
                kept_float[module_pattern(t.key)] = "embeddings kept float (--no-quantize-embeddings)"
        items.append(_Item(t, out_dt, [TensorSpec(key, out_dt, shape)]))
    record = quantization_record(spec, quantized, kept_float) if spec is not None else None
    return items, record


def _nothing_quantized(spec: QuantSpec, notes: list[str]) -> None:
    _warn(f"no layer has an input size divisible by the group size {spec.group_size}: the output is a float "
          "model (try a smaller --group-size)", notes)


def _cast(a: np.ndarray, dtype: np.dtype, key: str, notes: list[str]) -> np.ndarray:
    if a.dtype == dtype:
        return a
    with np.errstate(over="ignore"):
        out = a.astype(dtype)
    if dtype == np.float16 and np.isinf(out).any() and not np.isinf(a).any():
        _warn(f"{key}: values overflow float16 (became inf); prefer --dtype bfloat16", notes)
    return out


def _ensure_chat_template(directory: Path) -> None:
    """Writes the ChatML template as chat_template.jinja when the tokenizer files carry none."""
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return
    cfg = directory / "tokenizer_config.json"
    if cfg.is_file():
        try:
            if json.loads(cfg.read_text(encoding="utf-8")).get("chat_template"):
                return
        except ValueError:
            pass
    (directory / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")


def _open_adapter(adapter, source: Source, notes: list[str]):
    """(Adapter, official key -> module, official key -> fully trained tensor) checked against the source, or None."""
    if adapter is None:
        return None
    lora = read_adapter(adapter)
    ckpt = source.checkpoint
    fit_base(lora, ckpt.config, ckpt.manifest.required, str(ckpt.path))
    if source.quantization:
        _warn(f"fusing the adapter into {source.path}'s dequantized weights (the base is quantized; the fused "
              "weights are float unless -q quantizes them again)", notes)
    return lora, lora.official_keys(), lora.official_full()


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    to: str = "mlx",
    dtype: str | None = None,
    quantize_bits: int | None = None,
    group_size: int = 64,
    quantize_experts: bool = QUANTIZE_EXPERTS_DEFAULT,
    quantize_embeddings: bool = True,
    vision_tower: str | Path | None = None,
    force: bool = False,
    max_shard_bytes: int = 5 * 1024**3,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[Source], None] | None = None,
    config: str | Path | None = None,
    adapter: str | Path | None = None,
) -> ConversionResult:
    """Converts a Parrot model (official or MLX directory, or a hub id) to `to`: "mlx" or "hf" (official).

    dtype: float32 / float16 / bfloat16 for the float tensors; None keeps each tensor's stored dtype.
    quantize_bits: 4 or 8 (MLX output only), with `group_size` 32/64/128; `quantize_experts` decides
    the MoE experts and `quantize_embeddings` embed_tokens + lm_head. A quantized source is
    dequantized (lossy with respect to the original weights; a warning says so).
    vision_tower: a CLIP directory or id, merged when SRC lacks the tower weights, or supplying the
    tower config when `mm_vision_tower` does not resolve.
    progress: called with the source bytes of each tensor once written; on_start: with the opened source.
    SRC may also be a training checkpoint (the `step-N` directory of `parrot train`: DeepSpeed, DCP, or one
    process, whose trained tensors overlay the run's source model, see run_checkpoint.py); `config` names the
    directory with its config.json, tokenizer and preprocessor settings when the one the trainer wrote next
    to it (`step-N/model/`) is missing.
    adapter: a LoRA adapter directory trained on SRC, fused into the weights (W + scale (A B)^T in
    float32); a quantized SRC is dequantized first (the output is float unless quantize_bits is set).
    dst must not be, contain or lie inside any input (SRC, the tower, --config, the adapter, a training
    run's base model); an existing dst is replaced only with `force` and only when it is a previous
    `parrot convert` output (its `.parrot-output.json` marker, see parrot.storage.fsutil).
    """
    t0 = time.perf_counter()
    if to not in TARGETS:
        raise ParrotError(f"unknown target {to!r}; choose mlx or hf")
    if dtype is not None and dtype not in DTYPES:
        raise ParrotError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    spec = None
    if quantize_bits is not None:
        if to != "mlx":
            raise ParrotError("--quantize writes MLX weights; use it with --to mlx")
        spec = QuantSpec(int(quantize_bits), int(group_size), quantize_experts, quantize_embeddings)
    dst = Path(dst)
    given = [("source", src), ("--vision-tower", vision_tower), ("--config", config), ("--fuse-adapter", adapter)]
    check_output(dst, [(label, p) for label, p in given if p is not None and Path(str(p)).exists()], "DST")
    check_replaceable(dst, force, "convert", "DST")
    src_path = resolve_model_path(src)
    check_output(dst, [("source", src_path)], "DST")
    tower_arg = _tower_argument(vision_tower, src_path)
    source = open_source(src_path, tower_arg, config)
    check_output(dst, [("model description", source.path), ("vision tower", source.checkpoint.tower.directory),
                       *source.inputs], "DST")
    Tokenizer.from_dir(source.path)  # missing or broken tokenizer files fail before any weight is written
    notes: list[str] = []
    if source.quantization:
        q = source.quantization
        _warn(f"{source.path} holds {q.get('bits')}-bit quantized weights: they are dequantized, which does not "
              "recover the original weights (quantization is lossy)"
              + ("; quantizing them again adds a second rounding" if spec else ""), notes)
    lora = _open_adapter(adapter, source, notes)
    target_dt = NAME_TO_NP[dtype] if dtype else None
    items, record = _plan(source, to, target_dt, spec)
    if record is not None and not record["quantized"]:
        _nothing_quantized(spec, notes)
        record = None
    cfg = source.checkpoint.config
    cfg.vision_config = source.checkpoint.tower.config
    if vision_tower is not None:  # name the tower that resolved (an id as given, a directory absolute)
        local = Path(str(vision_tower))
        cfg.mm_vision_tower = str(local.resolve()) if local.exists() else str(vision_tower)
    out_dtype = dtype or source.stored_dtype()
    cfg.torch_dtype = out_dtype if out_dtype in DTYPES else cfg.torch_dtype
    cfg.quantization = record
    cfg.extra.pop("quantization_config", None)
    if on_start:
        on_start(source)
    with atomic_output_dir(dst, force=force, command="convert") as tmp:
        writer = ShardedWriter(tmp, [s for it in items for s in it.specs], max_shard_bytes,
                               metadata={"format": "mlx" if to == "mlx" else "pt"})
        try:
            for it in items:
                a = it.source.read()
                if lora is not None and it.source.key in lora[2]:  # trained fully beside the adapters
                    a = lora[2][it.source.key].astype(a.dtype)
                if lora is not None and it.source.key in lora[1]:
                    a = a.astype(np.float32) + lora[0].delta(lora[1][it.source.key])
                a = _cast(a, it.dtype, it.source.key, notes)
                if len(it.specs) == 3:
                    for s, arr in zip(it.specs, quantize(a, spec)):
                        writer.write(s.key, arr)
                else:
                    writer.write(it.specs[0].key, official_to_mlx_array(it.source.key, a) if to == "mlx" else a)
                del a
                if progress:
                    progress(it.source.nbytes)
            writer.close()
            cfg.save(tmp, layout="mlx")  # official readers ignore the extra vision_config
            source.checkpoint.tower.image.save(tmp)
            copy_tokenizer_files(source.path, tmp)
            _ensure_chat_template(tmp)
        except OSError as e:
            raise ParrotError(f"{dst}: writing the converted model failed ({e})") from None
    return ConversionResult(dst, to, out_dtype, record, source.total_bytes(), writer.bytes_written,
                            time.perf_counter() - t0, notes)
