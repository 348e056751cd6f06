"""The payload benchmark's smoke mode measures every payload at two vocabularies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_payload_benchmark_smoke_mode_writes_the_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    command = [sys.executable, "benchmarks/payload.py", "--smoke", "--results", str(tmp_path)]
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "payload.json").read_text())
    assert [v["vocab"] for v in results["vocabularies"]] == [30, 4096]
    for entry in results["vocabularies"]:
        vocab, width, modes = entry["vocab"], entry["teacher_hidden_size"], entry["modes"]
        assert set(modes) == {"sampled", "topk", "full", "hidden"}
        # fp32 tensors: the sampled log-prob (4 B) plus V logits or d hidden values
        assert modes["sampled"]["tensor_bytes_per_token"] == 4
        assert modes["full"]["tensor_bytes_per_token"] == 4 + 4 * vocab
        assert modes["hidden"]["tensor_bytes_per_token"] == 4 + 4 * width
        assert entry["hidden_bf16_tensor_bytes_per_token"] == 4 + 2 * width
        assert modes["hidden"]["jsd_relative_error"] < 1e-5  # exact, unlike top-k
        assert all(row["step"] > 0 for row in modes.values())
    table = (tmp_path / "payload.md").read_text()
    assert "| 4,096 | 64 | hidden |" in table and table in done.stdout
