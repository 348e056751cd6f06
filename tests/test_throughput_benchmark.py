"""The throughput benchmark's smoke mode runs every kind of run end to end (TRL included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_benchmark_smoke_mode_writes_the_table(tmp_path):
    pytest.importorskip("trl")
    distributed = (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
    )  # set by learners
    env = {k: v for k, v in os.environ.items() if k not in distributed}
    env.update(OMP_NUM_THREADS="1", RAY_ADDRESS="local", WANDB_MODE="disabled")
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "throughput.py"),
        "--smoke",
        "--results",
        str(tmp_path),
    ]
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "throughput.json").read_text())
    runs = results["runs"]
    assert any(name.startswith("TRL") for name in runs)
    assert any("pipelined" in name for name in runs)
    for name, run in runs.items():
        assert run["steps_per_s"] > 0 and run["tokens_per_s"] > 0, name
        if not name.startswith("TRL"):
            assert run["max_staleness_seen"] <= (1 if "pipelined" in name else 0)
            assert 0.0 <= run["phases"]["time/overhead_fraction"] <= 1.0
    modes = {row["mode"] for row in results["teacher_payload"]}
    assert {"sampled", "full"} <= modes
    assert "| run | steps/s |" in (tmp_path / "throughput.md").read_text()


@pytest.mark.parametrize("model", ["student", "teacher", "teacher_b", "student_h32"])
def test_real_model_flops_count_every_matmul_weight(model):
    """The FLOPs column of benchmarks/throughput_real.py counts 2 FLOPs per weight of every
    linear layer (the output head included, tied or not) per token: the same count read off
    the built model's nn.Linear modules."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from throughput_real import matmul_parameters

    from protege.modeling import load_model, resolve_path

    path = Path(resolve_path(f"builtin:tiny/{model}"))
    built = load_model(str(path))
    linear = sum(m.weight.numel() for m in built.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_parameters(path) == linear


def test_tree_memory_meter_sums_a_process_and_the_processes_it_starts():
    """benchmarks/tree_memory.py: a parent holding 100 MB whose child holds 200 MB peaks at
    >= 300 MB summed over both (ru_maxrss of the parent alone would say ~100 MB)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from tree_memory import run_metered

    child = "import time; x = bytearray(200_000_000); time.sleep(3)"
    parent = (
        "import subprocess, sys; x = bytearray(100_000_000); "
        f"subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    )
    code, _, _, peaks = run_metered([sys.executable, "-c", parent], interval=0.2)
    assert code == 0
    assert peaks["tree_processes"] >= 2
    assert peaks["tree_peak_rss_gib"] * 2**30 >= 300_000_000
    assert sum(peaks["tree_at_peak_gib"].values()) * 2**30 >= 300_000_000
