"""Slow tier: `python examples/osd.py` over a local Ray cluster, where the acceptance rate
of the domain-shifted draft must recover as updates land, and the benchmark's smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "RAY_ADDRESS": "local"}


@pytest.mark.slow
def test_example_acceptance_recovers_as_updates_land(tmp_path):
    """The preset as shipped (400 requests, Ray actors for the server and the learner)."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "examples" / "osd.py"), f"output_dir={out}"]
    done = subprocess.run(
        command, check=False, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "acceptance rate:" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    totals = summary["totals"]
    assert totals["total/updates"] >= 5
    initial = totals["initial_draft/acceptance_rate"]
    assert totals["second_half/acceptance_rate"] > initial + 0.15
    assert totals["total/heldout_kl_last"] < 0.5 * totals["total/heldout_kl_first"]
    assert (out / "acceptance.png").exists() or (out / "acceptance.svg").exists()


@pytest.mark.slow
def test_benchmark_smoke_writes_its_table(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "osd.py"),
        "--smoke",
        "--workdir",
        str(tmp_path),
        "--results",
        str(tmp_path / "results"),
    ]
    done = subprocess.run(
        command, check=False, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "osd_smoke.json").read_text())
    assert [r["arm"].split(" ")[0] for r in results] == ["no", "static", "online-distilled"]
    assert results[0]["totals"]["total/tokens_per_round"] == 1.0  # one token per forward
    assert results[2]["totals"]["total/updates"] >= 1
