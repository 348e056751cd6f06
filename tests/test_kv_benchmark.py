"""The KV ablation benchmark's smoke mode: every arm of the ladder runs and is reported."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _benchmark():
    spec = importlib.util.spec_from_file_location(
        "kv_ablation", ROOT / "benchmarks" / "kv_ablation.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_runs_every_arm_and_writes_the_table(tmp_path):
    bench = _benchmark()
    result = bench.main(["--smoke", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path)])
    arms = [row["name"] for row in result["summary"]]
    assert arms == [arm.name for arm in bench.ARMS]
    saved = json.loads((tmp_path / "kv_ablation_smoke.json").read_text())
    assert saved["meta"]["steps"] == 4 and saved["meta"]["seeds"] == 1
    table = (tmp_path / "kv_ablation_smoke.md").read_text()
    assert table.count("\n| ") == len(arms) + 2  # header, separator, one row per arm
    for row in result["summary"][1:]:
        assert row["versus_baseline"]["b"] == "control"  # paired with the control, seed by seed
    assert result["meta"]["total_minutes"] < 3.0  # ten pipeline builds


def test_arm_configs_are_valid_and_differ_only_in_kv_settings(tmp_path):
    from protege.config import config_from_dict

    bench = _benchmark()
    configs = [
        config_from_dict(bench.arm_config(arm, 0, 10, 16, tmp_path, tmp_path)) for arm in bench.ARMS
    ]
    for config in configs:
        algorithm = config.algorithm
        assert algorithm["name"] == "kv_distill" and algorithm["delta"] == 0.1
        assert (config.learner.lr, config.trainer.steps, config.trainer.batch_size) == (
            3e-3,
            10,
            32,
        )
        assert all(t.kv_cache for t in config.teachers)
    distill = [c.build_algorithm().distill for c in configs]
    assert not distill[0] and all(distill[1:])
