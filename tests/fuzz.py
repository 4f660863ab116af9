"""Shared pieces of the fuzz tests (tests/test_fuzz_*.py): hypothesis settings, the per-loader case
counter, and mutators that damage valid files (bytes and JSON structure).

Every fuzz test states one property: whatever the input, the loader returns normally or raises
`ParrotError`; any other exception is a bug to fix in the loader. Hypothesis drives each case through
a `random.Random` it seeds (`cases()`), reproducibly (`derandomize=True`, no example database written
into the repository); the mutation itself is plain Python, about a millisecond per case on two busy
cores, so each loader gets thousands of cases within the suite's budget. A failure prints the
`@reproduce_failure` blob that replays its case. `COUNTS` records how many cases each loader was fed;
the terminal summary prints it (tests/conftest.py) and docs/benchmarks.md's "Reliability" section
quotes it.

Adding a loader: build its input from a valid example with `mutate_bytes` / `mutate_json` /
`jsonl_lines`, then `@FUZZ(n) @given(cases())` and `only_parrot_errors("name", loader, ...)`.
`tsv_input()` damages a VLMEvalKit TSV (tests/test_fuzz_eval.py).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis: pip install -e '.[dev]'")

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from parrot.errors import ParrotError  # noqa: E402

COUNTS: Counter[str] = Counter()  # loader -> cases tried in this session
REFUSED: Counter[str] = Counter()  # loader -> cases that ended in ParrotError (the rest loaded)
NOTES: Counter[str] = Counter()  # other figures a fuzz test reports (printed as they are)


def FUZZ(max_examples: int):  # noqa: N802  (a decorator, named like hypothesis' own)
    """Reproducible hypothesis settings for a fuzz test of `max_examples` cases (a tenth under
    PARROT_QUICK=1, `make test-quick`'s setting; the full suite runs them all)."""
    if os.environ.get("PARROT_QUICK") == "1":
        max_examples = max(20, max_examples // 10)
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def cases() -> st.SearchStrategy[random.Random]:
    """One fuzz case: a Random seeded by hypothesis (so derandomized runs repeat exactly)."""
    return st.randoms(use_true_random=True)


def only_parrot_errors(loader: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Calls `fn` and counts the case under `loader`. A ParrotError (with a message) is an accepted
    outcome (returns None); any other exception propagates and fails the test."""
    COUNTS[loader] += 1
    try:
        return fn(*args, **kwargs)
    except ParrotError as e:
        REFUSED[loader] += 1
        assert str(e).strip(), "a ParrotError needs a message"
        return None


def write(path: Path, data: bytes) -> Path:
    """Replaces a file's bytes (unlink first: rewriting a file in place makes ext4 flush it, ~2 ms here)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- JSON values
NUMBERS = [0, -1, 1, 2, 3, 7, 64, -2**31, 2**31 - 1, 2**31, 2**63, 10**15, 10**30, 0.5, 2.0, -0.0, 1e-300, 1e300,
           math.inf, -math.inf, math.nan]
STRINGS = ["", " ", "0", "1", "yes", "true", "null", "NaN", "<image>", "<image>\n<image>", "<|im_end|>", "\x00",
           "\ud800", "../..", "/", "a" * 5000, "é中🦜", "mlp0x_gelu", "mlp99999999x_gelu", "mlp2x_gelu", "float64",
           "bfloat16", "anyres", "pad", "cls_patch", "lora", "human", "gpt", "system", "img0.png", "nope.png"]


def random_json(r: random.Random, depth: int = 3) -> Any:
    """An arbitrary JSON value (mostly edge cases: zero, huge, NaN, empty, odd strings)."""
    k = r.randrange(12 if depth > 0 else 8)
    if k == 0:
        return None
    if k == 1:
        return r.random() < 0.5
    if k in (2, 3):
        return r.choice(NUMBERS)
    if k == 4:
        return r.randint(-10**6, 10**6) if r.random() < 0.7 else r.uniform(-1e6, 1e6)
    if k in (5, 6):
        return r.choice(STRINGS)
    if k == 7:
        return "".join(chr(r.choice([r.randrange(32, 127), r.randrange(0x80, 0x3000)])) for _ in range(r.randrange(9)))
    if k in (8, 9):
        return [random_json(r, depth - 1) for _ in range(r.randrange(4))]
    return {r.choice(STRINGS[:12] + ["id", "x"]): random_json(r, depth - 1) for _ in range(r.randrange(4))}


class Deep:
    """JSON text nested n levels deep ([[[...1...]]]): deeper than Python's json can write or read."""

    def __init__(self, n: int):
        self.n = n

    def text(self) -> str:
        return "[" * self.n + "1" + "]" * self.n


def mutate_json(r: random.Random, valid: Any, keys: list[str] | tuple = ()) -> Any:
    """`valid` with 1-3 edits, each at a random depth: a value set to an odd one, a key deleted or renamed,
    a list item dropped or added (`keys` may add top-level names it lacks); one case in 20 is replaced
    whole (another value, or deep nesting)."""
    if r.randrange(20) == 0:
        return Deep(r.choice([65, 500, 5000])) if r.random() < 0.3 else random_json(r)
    v = json.loads(json.dumps(valid))
    if not isinstance(v, dict | list):
        return random_json(r)
    for _ in range(r.randint(1, 3)):
        target = v  # walk down: at each container, stop or go into one of its containers
        while True:
            inner = [x for x in (target.values() if isinstance(target, dict) else target) if isinstance(x, dict | list)]
            if not inner or r.random() < 0.3:
                break
            target = r.choice(inner)
        action = r.randrange(10)
        if isinstance(target, list):
            i = r.randrange(len(target) + 1)
            if action == 0 and i < len(target):
                del target[i]
            elif action == 1 or i == len(target):
                target.insert(i, random_json(r))
            else:
                target[i] = random_json(r)
            continue
        names = sorted(set(target) | set(keys if target is v else ()))
        if not names:
            target[r.choice(STRINGS[:8])] = random_json(r)
            continue
        k = r.choice(names)
        if action == 0:
            target.pop(k, None)
        elif action == 1:
            target[r.choice(STRINGS[:8])] = target.pop(k, None)
        else:
            target[k] = random_json(r)
    return v


def dumps(v: Any) -> bytes:
    """JSON bytes as a careless writer might produce them: NaN and Infinity kept, lone surrogates escaped,
    `Deep` values (anywhere) written out."""
    deep: list[Deep] = []

    def mark(d: Deep) -> str:
        deep.append(d)
        return f"\x00deep{len(deep) - 1}"

    try:
        text = json.dumps(v, ensure_ascii=False, default=mark).encode("utf-8")
    except UnicodeEncodeError:
        deep.clear()
        text = json.dumps(v, default=mark).encode()
    for i, d in enumerate(deep):
        text = text.replace(json.dumps(f"\x00deep{i}").encode(), d.text().encode())
    return text


def json_input(r: random.Random, valid: Any, keys: list[str] | tuple = ()) -> bytes:
    """A JSON file: mostly `valid` with fields mutated, sometimes its text with bytes mutated."""
    if r.random() < 0.25:
        return mutate_bytes(r, dumps(valid))
    return dumps(mutate_json(r, valid, keys))


# ---------------------------------------------------------------- bytes
def mutate_bytes(r: random.Random, seed: bytes, protect: int = 0, edits: int = 4) -> bytes:
    """`seed` with 1-`edits` edits: bytes overwritten, set to extremes, inserted or deleted, a slice repeated,
    the file cut. `protect`: leading bytes left alone (a format's magic number, so the decoder is reached)."""
    b = bytearray(seed)
    for _ in range(r.randint(1, edits)):
        n = len(b)
        i = r.randint(min(protect, n), max(n, protect))
        op = r.randrange(7)
        if op in (0, 1):  # overwrite a few bytes
            b[i:i + 1 + r.randrange(4)] = r.randbytes(1 + r.randrange(4))
        elif op == 2 and i < n:  # one byte to an extreme
            b[i] = r.choice([0, 1, 0x7F, 0x80, 0xFF])
        elif op == 3:  # insert
            b[i:i] = r.randbytes(1 + r.randrange(16))
        elif op == 4:  # delete
            del b[i:i + 1 + r.randrange(64)]
        elif op == 5:  # truncate
            del b[max(i, protect):]
        else:  # repeat a slice
            j = min(n, i + 1 + r.randrange(64))
            b[j:j] = b[i:j] * (1 + r.randrange(8))
    return bytes(b)


def jsonl_lines(r: random.Random, rows: list[dict]) -> bytes:
    """A JSONL file: valid and mutated rows, odd values, blank lines, invalid UTF-8, a BOM, a torn line."""
    lines = []
    for _ in range(r.randrange(7)):
        kind = r.randrange(6)
        if kind <= 2:
            lines.append(dumps(mutate_json(r, r.choice(rows))))
        elif kind == 3:
            lines.append(dumps(random_json(r)))
        elif kind == 4:
            lines.append(r.choice([b"", b"  ", b"\xff\xfe", b"{", b"[1,", b"\xef\xbb\xbf{}", b"\r", b"\x00"]))
        else:
            lines.append(mutate_bytes(r, dumps(r.choice(rows))))
    return b"\n".join(lines) + r.choice([b"", b"\n", b"\n\n"])


# ---------------------------------------------------------------- TSV (parrot eval)
def tsv_table(rows: int = 3) -> bytes:
    """A small VLMEvalKit MCQ TSV (index, question, A-D, answer, category, image as base64)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
    img = base64.b64encode(buf.getvalue()).decode()
    head = "index\tquestion\tA\tB\tC\tD\tanswer\tcategory\timage"
    body = [f"{i}\tWhat colour?\tred\tgreen\tblue\tgrey\tA\tcolour\t{img}" for i in range(rows)]
    return ("\n".join([head, *body]) + "\n").encode()


def tsv_input(r: random.Random) -> bytes:
    """A damaged VLMEvalKit TSV (tests/test_fuzz_eval.py)."""
    return mutate_bytes(r, tsv_table())
