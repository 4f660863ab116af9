"""`torchrun --nproc_per_node 2 ... parrot eval` (gloo, CPU) writes the same files as one process."""

from __future__ import annotations

import json

import pytest
from dist_helpers import launch
from eval_helpers import circular_rows, mcq_rows, write_tsv

from conftest import requires_torch

pytestmark = [requires_torch, pytest.mark.slow]


def test_two_processes_equal_one(tmp_path, tiny_ckpt):
    a = write_tsv(tmp_path / "data" / "toy_ru.tsv", mcq_rows(5))
    b = write_tsv(tmp_path / "data" / "MMBench_toy_en.tsv", circular_rows(2))

    def args(out):
        return ["eval", str(a), str(b), "--model", str(tiny_ckpt), "--backend", "cpu", "-o", str(out),
                "--max-tokens", "6", "--batch-size", "2", "--quiet"]

    launch(args(tmp_path / "one"), nproc=1, launcher="none", timeout=300)
    out = launch(args(tmp_path / "two"), nproc=2, timeout=300)
    assert "toy" in out and "MMBench_toy" in out
    for name in ("toy_ru", "MMBench_toy_en"):
        for suffix in (".tsv", "_acc.csv", "_result.tsv"):
            one, two = (tmp_path / d / f"{name}{suffix}" for d in ("one", "two"))
            assert one.read_bytes() == two.read_bytes(), f"{name}{suffix}"
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text())["datasets"] for d in ("one", "two"))
    for name in s1:
        assert s1[name]["overall"] == s2[name]["overall"] and s1[name]["categories"] == s2[name]["categories"]
        assert s2[name]["unanswered"] == []
