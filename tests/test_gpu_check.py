"""benchmarks/gpu_check.sh cannot run here (no GPU): what a CPU can check of it is checked —
the shell syntax, the plan, the parameter count of the model it builds, the verdict logic
(a log-prob gap past the tolerance, a failed stage or a skipped gpu test fails the check),
and (slow tier) the whole script in its CPU smoke mode."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def helper():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_parses_and_its_dry_run_prints_the_plan():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "pytest -m gpu" in done.stdout and "494.0 M parameters, bfloat16" in done.stdout
    bad = subprocess.run(
        ["bash", str(SCRIPT), "--what"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "usage:" in bad.stderr


def test_the_parameter_count_is_the_built_models():
    from protege.tasks.tiny_models import build_tiny_model, tiny_config

    check = helper()
    assert check.parameters(check.SHAPES["qwen2.5-0.5b"]) == 494_032_768  # Qwen2.5-0.5B's
    layers, hidden, heads, kv_heads, mlp, vocab = check.SHAPES["tiny"]
    model = build_tiny_model(tiny_config(layers, hidden, heads, kv_heads, mlp, vocab), seed=0)
    assert check.parameters(check.SHAPES["tiny"]) == sum(p.numel() for p in model.parameters())


def test_a_mismatch_or_a_failure_fails_the_check():
    check = helper()
    args = SimpleNamespace(atol=1e-3, dtype="bfloat16")
    good = {"ok": True, "vllm_parity_full": {"max": 5e-4, "mean": 1e-4, "tokens": 9}}
    tests = {"tests": 3, "failures": 0, "errors": 0, "skipped": 0}
    assert check.checks({"vllm_rollout": good}, tests, args) == []
    off = {**good, "vllm_parity_full": {"max": 2e-3, "mean": 1e-4, "tokens": 9}}
    assert "vllm_parity_full" in check.checks({"vllm_rollout": off}, tests, args)[0]
    crashed = {"ok": False, "error": "RuntimeError: CUDA out of memory"}
    assert "stage step failed: RuntimeError" in check.checks({"step": crashed}, tests, args)[0]
    skipped = {**tests, "skipped": 1}
    assert "skipped on a GPU machine" in check.checks({}, skipped, args)[0]
    assert "none ran" in check.checks({}, {**tests, "tests": 0}, args)[0]
    meta = {"date": "d", "device": "x", "command": "c", "shape": "tiny", "parameters": 1,
            "dtype": "float32", "prompts": 1, "samples": 1, "max_new_tokens": 1}  # fmt: skip
    report = {"meta": meta, "stages": {"vllm_rollout": off}, "gpu_tests": tests}
    report["failed"] = check.checks(report["stages"], tests, args)
    assert "**FAILED**" in check.markdown(report) and "2.0e-03 / 1.0e-04" in check.markdown(report)


@pytest.mark.slow  # five fresh interpreters and a protege run: ~1.5 min on 2 cores
def test_the_cpu_smoke_runs_every_stage_it_can_and_writes_the_report(tmp_path):
    env = {**os.environ, "RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(SCRIPT), "--cpu"], capture_output=True, text=True, env=env, timeout=900,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed"] == [] and report["stages"]["step"]["step_s"] > 0
    hf = report["stages"]["hf_rollout"]
    assert hf["hf_tokens_per_s"] > 0 and hf["hf_parity_full"]["max"] < 1e-4
    assert hf["hf_parity_lora"]["max"] < 1e-4  # the random adapter reached the sampler
    assert "**PASSED**" in (tmp_path / "gpu_check.md").read_text()
