"""What every field of the files we read must be: one table per file kind, checked when loading.

A table maps a field to a `Rule` (JSON kinds, range, choices); defaults live in the dataclasses that
hold the values. `check(value, rule, source)` raises one ParrotError naming the file, the field, the
value and what is expected (`config.json: hidden_size is "sixty-four" (a string); expected a positive
integer`). Unknown keys are not checked (readers keep them in `extra`). Relations between fields
(heads dividing the hidden size) are declared beside the tables. The JSON-schema idea without its
dependency: our rules are few, and the messages must speak the user's words.

Tables: PARROT_CONFIG (config.json; VISION_CONFIG nested as `vision_config`, QUANTIZATION as
`quantization`), VISION_CONFIG (also a CLIP tower's config.json), PREPROCESSOR, TRAIN_CONFIG /
RUN_CONFIG (run_config.json) and ADAPTER_CONFIG.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import ParrotError

DTYPES = ("float32", "float16", "bfloat16")
MAX_SIZE = 2**31 - 1  # sizes beyond int32 are corruption, not models
MAX_COUNT = 4096  # layers, experts: the parameter list is built per item before any weight is read
MAX_IMAGE_SIDE = 2048  # crop / resize / CLIP image sides (CLIP: 224 or 336; bounds preprocessing memory)
MAX_PROJECTOR_DEPTH = 32
MAX_DEPTH = 64  # JSON nesting: deeper is never a config, and would exhaust Python's recursion later
PROJECTOR = re.compile(r"mlp(\d+)x_gelu")
VISION_ACTS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")

_NOUN = {"bool": "a boolean", "int": "an integer", "number": "a number", "str": "a string",
         "list": "a list", "object": "an object"}


def kind_of(v: Any) -> str:
    """The JSON kind of a parsed value: null, bool, int, number, str, list or object."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "str"
    if isinstance(v, list | tuple):
        return "list"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def show(v: Any, limit: int = 60) -> str:
    """A value as JSON, cut to `limit` characters."""
    if too_deep(v):
        return f"<{_NOUN.get(kind_of(v), kind_of(v))} nested more than {MAX_DEPTH} levels deep>"
    try:
        s = json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def too_deep(v: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether lists / objects nest more than `limit` levels (checked without recursion)."""
    stack = [(v, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, dict):
            x = list(x.values())
        if isinstance(x, list | tuple):
            if depth > limit:
                return True
            stack.extend((y, depth + 1) for y in x if isinstance(y, list | tuple | dict))
    return False


def parse_json(raw: str | bytes, source: str) -> Any:
    """json.loads with one ParrotError `{source}: not valid JSON (...)` for text that is not JSON, not
    UTF-8, or nested more than MAX_DEPTH levels deep."""
    try:
        v = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except RecursionError:
        v = None
    except ValueError as e:  # UnicodeDecodeError included
        raise ParrotError(f"{source}: not valid JSON ({e})") from None
    else:
        if not too_deep(v):
            return v
    raise ParrotError(f"{source}: not valid JSON (nested more than {MAX_DEPTH} levels deep)")


@dataclass(frozen=True)
class Relation:
    """A check across fields of the resolved values: `test(*values)`. `says` is the message, each
    `{field}` in it replaced by the field's name and value."""

    names: tuple[str, ...]
    test: Callable[..., bool]
    says: str


@dataclass(frozen=True)
class Rule:
    """What one JSON value must be: `kinds` accepted ("number" accepts ints too); numbers finite, in
    [lo, hi] (`lo_open`/`hi_open` exclude a bound); strings matching `pattern`; lists of `items`; objects
    with `fields` (and `rest` for other keys). `expected`: the words of the message."""

    kinds: tuple[str, ...]
    expected: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()
    pattern: re.Pattern | None = None
    items: Rule | None = None
    length: int | None = None
    fields: Mapping[str, Rule] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    rest: Rule | None = None
    relations: tuple[Relation, ...] = ()

    def or_null(self) -> Rule:
        return replace(self, kinds=(*self.kinds, "null"), expected=f"{self.expected} or null")


# ---------------------------------------------------------------- rule constructors
def integer(lo: int | None = None, hi: int | None = None, expected: str | None = None) -> Rule:
    if expected is None:
        expected = ("an integer" if lo is None else "a positive integer" if lo == 1 else
                    "a non-negative integer" if lo == 0 else f"an integer >= {lo}")
    return Rule(("int",), expected, lo=lo, hi=hi)


def size(hi: int = MAX_SIZE) -> Rule:
    return integer(1, hi)


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
           expected: str | None = None) -> Rule:
    if expected is None:
        if lo is None and hi is None:
            expected = "a finite number"
        elif lo == 0 and lo_open and hi is None:
            expected = "a positive number"
        elif hi is None:
            expected = f"a number {'>' if lo_open else '>='} {lo}"
        else:
            expected = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return Rule(("int", "number"), expected, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)


def boolean() -> Rule:
    return Rule(("bool",), "true or false")


def string(pattern: str | None = None, expected: str = "a string") -> Rule:
    return Rule(("str",), expected, pattern=re.compile(pattern) if pattern else None)


def one_of(*choices: Any) -> Rule:
    kinds = tuple(dict.fromkeys(kind_of(c) for c in choices))
    words = ", ".join(show(c) for c in choices)
    return Rule(kinds, f"one of {words}" if len(choices) > 1 else words, choices=choices)


def list_of(items: Rule, length: int | None = None, expected: str | None = None) -> Rule:
    if expected is None:
        expected = f"a list of {length} values" if length else "a list"
        expected += f" (each {items.expected})"
    return Rule(("list",), expected, items=items, length=length)


def obj(fields: Mapping[str, Rule] | None = None, required: tuple[str, ...] = (), rest: Rule | None = None,
        relations: tuple[Relation, ...] = (), expected: str = "an object") -> Rule:
    return Rule(("object",), expected, fields=dict(fields or {}), required=required, rest=rest, relations=relations)


# ---------------------------------------------------------------- checking
def _fail(source: str, name: str, v: Any, rule: Rule, kind_wrong: bool) -> ParrotError:
    noun = f" ({_NOUN.get(kind_of(v), kind_of(v))})" if kind_wrong and v is not None else ""
    expected = rule.expected
    if not kind_wrong and rule.hi is not None and kind_of(v) in ("int", "number") and v > rule.hi \
            and str(rule.hi) not in expected:
        expected += f" of at most {rule.hi}"
    return ParrotError(f"{source}: {name} is {show(v)}{noun}; expected {expected}")


def _kind_ok(v: Any, rule: Rule) -> bool:
    k = kind_of(v)
    return k in rule.kinds or (k == "int" and "number" in rule.kinds)


def check(v: Any, rule: Rule, source: str, name: str = "") -> None:
    """Raises ParrotError unless `v` (a parsed JSON value) follows `rule`; `name` is its dotted path."""
    label = name or "the file"
    if not name and too_deep(v):
        raise ParrotError(f"{source}: nested more than {MAX_DEPTH} levels deep; not a file we write or read")
    if not _kind_ok(v, rule):
        raise _fail(source, label, v, rule, kind_wrong=True)
    if v is None:
        return  # null, where the rule allows it
    if rule.choices and not any(v == c and kind_of(v) == kind_of(c) for c in rule.choices):
        raise _fail(source, label, v, rule, kind_wrong=False)
    k = kind_of(v)
    if k in ("int", "number"):
        bad = not math.isfinite(v) if k == "number" else False
        if rule.lo is not None:
            bad |= v <= rule.lo if rule.lo_open else v < rule.lo
        if rule.hi is not None:
            bad |= v >= rule.hi if rule.hi_open else v > rule.hi
        if bad:
            raise _fail(source, label, v, rule, kind_wrong=False)
    elif k == "str" and rule.pattern is not None and not rule.pattern.fullmatch(v):
        raise _fail(source, label, v, rule, kind_wrong=False)
    elif k == "list":
        if rule.length is not None and len(v) != rule.length:
            raise _fail(source, label, v, rule, kind_wrong=False)
        if rule.items is not None:
            for i, x in enumerate(v):
                check(x, rule.items, source, f"{label}[{i}]")
    elif k == "object":
        prefix = f"{name}." if name else ""
        for key in rule.required:
            if key not in v:
                what = rule.fields[key].expected if key in rule.fields else "a value"
                raise ParrotError(f"{source}: {prefix}{key} is missing; expected {what}")
        for key, x in v.items():
            sub = rule.fields.get(key, rule.rest)
            if sub is not None:
                check(x, sub, source, f"{prefix}{key}")
        check_relations(v, rule.relations, source, prefix)


def check_relations(values: Mapping[str, Any], relations: tuple[Relation, ...], source: str,
                    prefix: str = "") -> None:
    """Each relation whose fields are all present (and not null) must hold."""
    for r in relations:
        args = [values.get(n) for n in r.names]
        if any(a is None for a in args) or r.test(*args):
            continue
        words = r.says.format(**{n: f"{prefix}{n} {show(a)}" for n, a in zip(r.names, args)})
        raise ParrotError(f"{source}: {words}")


def projector_depth(projector_type: str, source: str = "config.json") -> int:
    """N of an `mlpNx_gelu` projector (N Linear layers with GELU between)."""
    check(projector_type, PROJECTOR_TYPE, source, "mm_projector_type")
    return int(PROJECTOR.fullmatch(projector_type).group(1))


# ---------------------------------------------------------------- the tables
SIZE = size()
COUNT = size(MAX_COUNT)
IMAGE_SIDE = size(MAX_IMAGE_SIDE)
PROJECTOR_TYPE = string(
    r"mlp([1-9]|[12][0-9]|3[0-2])x_gelu",
    f"'mlp2x_gelu' or another 'mlpNx_gelu' (N from 1 to {MAX_PROJECTOR_DEPTH})",
)


def _divides(divisor: str, dividend: str) -> Relation:
    return Relation((dividend, divisor), lambda a, b: a % b == 0,
                    f"{{{dividend}}} is not divisible by {{{divisor}}}")


VISION_CONFIG = obj({  # transformers' CLIPVisionConfig (a CLIP tower's config.json, or our `vision_config`)
    "hidden_size": SIZE,
    "intermediate_size": SIZE,
    "num_hidden_layers": COUNT,
    "num_attention_heads": SIZE,
    "image_size": IMAGE_SIDE,
    "patch_size": IMAGE_SIDE,
    "num_channels": one_of(3),
    "hidden_act": one_of(*VISION_ACTS),
    "layer_norm_eps": number(0, lo_open=True),
    "projection_dim": SIZE,
    "model_type": string(),
}, relations=(
    _divides("num_attention_heads", "hidden_size"),
    Relation(("patch_size", "image_size"), lambda p, i: p <= i, "{patch_size} is larger than {image_size}"),
))

ROPE_TYPES = ("default", "linear", "dynamic", "yarn")  # what both backends (transformers, mlx-lm) implement
ROPE_SCALING = obj({  # transformers' rope_scaling (mlx-lm reads "type" first, transformers "rope_type")
    "rope_type": one_of(*ROPE_TYPES),
    "type": one_of(*ROPE_TYPES),
    "factor": number(0, lo_open=True),
    "rope_theta": number(0, lo_open=True),
    "original_max_position_embeddings": SIZE,
    **{k: number() for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor")},
})

QUANTIZATION = obj({  # mlx-lm's config.json entry; other keys are per-module overrides (an object, or false)
    "group_size": SIZE,
    "bits": one_of(2, 3, 4, 5, 6, 8),
    "mode": string(),
    "quantized": list_of(string()),
    "kept_float": obj(),
}, required=("group_size", "bits"), rest=Rule(("bool", "object"), "true, false or an object", fields={
    "group_size": SIZE, "bits": one_of(2, 3, 4, 5, 6, 8), "mode": string()}))

PARROT_CONFIG = obj({  # a Parrot model's config.json (model_type parrot_qwen2)
    "model_type": string(),
    "vocab_size": SIZE,
    "hidden_size": SIZE,
    "intermediate_size": SIZE,
    "num_hidden_layers": COUNT,
    "num_attention_heads": SIZE,
    "num_key_value_heads": SIZE,
    "max_position_embeddings": SIZE,
    "rms_norm_eps": number(0, lo_open=True),
    "rope_theta": number(0, lo_open=True).or_null(),
    "rope_scaling": ROPE_SCALING.or_null(),
    "rope_parameters": obj({"rope_theta": number(0, lo_open=True)}).or_null(),
    "tie_word_embeddings": boolean(),
    "torch_dtype": one_of(*DTYPES).or_null(),
    "dtype": one_of(*DTYPES).or_null(),
    "use_sliding_window": boolean().or_null(),
    "mm_vision_tower": string().or_null(),
    "mm_hidden_size": SIZE,
    "mm_projector_type": PROJECTOR_TYPE,
    "mm_vision_select_layer": integer(-MAX_SIZE, MAX_SIZE, "an integer"),  # the range is checked against the tower
    "mm_vision_select_feature": one_of("cls_patch", "patch"),
    "image_aspect_ratio": string().or_null(),
    "mm_patch_merge_type": one_of("flat"),
    "num_experts": COUNT,
    "moe_hidden_size": SIZE.or_null(),
    "moe_intermediate_size": SIZE,
    "moe_top_k": SIZE,
    "moe_weight": number(),
    "use_moe": boolean(),
    "use_moe_residual": boolean(),
    "vision_config": VISION_CONFIG.or_null(),
    "quantization": QUANTIZATION.or_null(),
}, required=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"))

PARROT_RELATIONS = (  # checked on the resolved ParrotConfig
    _divides("num_attention_heads", "hidden_size"),
    _divides("num_key_value_heads", "num_attention_heads"),
    Relation(("hidden_size", "num_attention_heads"), lambda h, n: (h // n) % 2 == 0,
             "{hidden_size} / {num_attention_heads} is an odd head size; rotary embeddings need an even one"),
    Relation(("moe_hidden_size", "hidden_size"), lambda m, h: m == h,
             "{moe_hidden_size} must equal {hidden_size}"),
    Relation(("image_aspect_ratio",), lambda a: a != "anyres", "{image_aspect_ratio} is not supported (only flat "
             "patch merging without anyres is)"),
    Relation(("use_sliding_window",), lambda s: s is not True, "{use_sliding_window} is not supported"),
)

PREPROCESSOR = obj({  # transformers' CLIPImageProcessor preprocessor_config.json
    "crop_size": Rule(("int", "object"), f"a positive integer up to {MAX_IMAGE_SIDE} or an object "
                      "{\"height\", \"width\"}", lo=1, hi=MAX_IMAGE_SIDE,
                      fields={"height": IMAGE_SIDE, "width": IMAGE_SIDE}, required=("height", "width")),
    "size": Rule(("int", "object"), f"a positive integer up to {MAX_IMAGE_SIDE} or an object "
                 "{\"shortest_edge\"}", lo=1, hi=MAX_IMAGE_SIDE,
                 fields={"shortest_edge": IMAGE_SIDE, "height": IMAGE_SIDE, "width": IMAGE_SIDE}),
    "image_mean": list_of(number(0, 1), 3, "a list of 3 numbers in [0, 1]"),  # also the padding colour
    "image_std": list_of(number(0, lo_open=True), 3, "a list of 3 positive numbers"),
    "rescale_factor": number(0, lo_open=True),
    "resample": integer(0, 5, "a PIL resampling filter (an integer from 0 to 5)"),
    "do_resize": boolean(),
    "do_center_crop": boolean(),
    "do_rescale": boolean(),
    "do_normalize": boolean(),
    "do_convert_rgb": boolean().or_null(),
})

TRAIN_CONFIG = obj({  # TrainConfig (a run's settings, as run_config.json records them)
    "stage": one_of(1, 2),
    "data": string(), "output": string(),
    **{k: string().or_null() for k in ("model", "llm", "vision_tower", "image_dir", "deepspeed")},
    "backend": string().or_null(),  # null: the machine's default (parrot.registry.default_backend)
    "lr": number(0).or_null(),
    "batch_size": SIZE.or_null(), "grad_accum": SIZE.or_null(),
    "epochs": SIZE, "max_steps": SIZE.or_null(), "max_length": SIZE,
    "seed": integer(0),
    "dtype": one_of(*DTYPES).or_null(),
    "save_every": SIZE, "save_total_limit": SIZE.or_null(),
    **{k: boolean() for k in ("resume", "train_vision", "no_moe", "gradient_checkpointing", "truncate", "fsdp",
                              "lora", "packing")},
    "num_workers": integer(0),
    "warmup_ratio": number(0, 1, hi_open=True),
    "weight_decay": number(0),
    "max_grad_norm": number(0, lo_open=True).or_null(),
    "num_experts": COUNT, "moe_intermediate_size": SIZE, "moe_weight": number(),
    "lora_rank": SIZE.or_null(), "lora_scale": number().or_null(), "lora_alpha": number().or_null(),
    "lora_dropout": number(0, 1, hi_open=True).or_null(),
    "lora_targets": list_of(string()).or_null(),
    "lora_layers": SIZE.or_null(),
    **{k: boolean() for k in ("lora_only", "group_by_modality_length", "save_best")},
    "quantize": one_of(4).or_null(),
    "mm_projector_lr": number(0).or_null(), "moe_lr": number(0).or_null(),
    "report_to": one_of("none", "tensorboard", "wandb"),
    "eval_data": list_of(string()).or_null(), "eval_every": SIZE.or_null(), "eval_limit": SIZE.or_null(),
    "save_layout": one_of("official", "mlx"),
}, required=("stage", "data", "output"))

RESOLVED = {"lr": number(0), "batch_size": SIZE, "grad_accum": SIZE, "dtype": one_of(*DTYPES), "image_dir": string()}
RUN_CONFIG = obj({  # run_config.json: {"config": TrainConfig.resolved(), "derived": {...}}
    "config": replace(TRAIN_CONFIG, fields={**TRAIN_CONFIG.fields, **RESOLVED},
                      required=(*TRAIN_CONFIG.required, *RESOLVED)),
    "derived": obj({"world_size": SIZE}),
}, required=("config",))

ADAPTER_CONFIG = obj({  # mlx-lm's adapter_config.json, plus our "parrot" record
    "fine_tune_type": string(),
    "model": string().or_null(),
    "num_layers": integer(-1),  # mlx-lm: -1 means every layer
    "lora_parameters": obj({
        "rank": SIZE,
        "scale": number(),
        "dropout": number(0, 1, hi_open=True),
        "keys": list_of(string()),
    }, required=("rank", "scale"), expected="an object with rank and scale"),
    "parrot": obj({
        "format": integer(),
        "alpha": number().or_null(),
        "targets": list_of(string()),
        "modules": list_of(string()),
        "base": obj(rest=SIZE.or_null()),
        "base_quantization": QUANTIZATION.or_null(),
        "use_moe": boolean().or_null(),
    }),
}, required=("lora_parameters",))
