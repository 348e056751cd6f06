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
    assert result["meta"]["total_minutes"] < 1.0


def test_arm_configs_are_valid_and_differ_only_in_kv_settings(tmp_path):
    from protege.kv.config import kv_config_from_dict

    bench = _benchmark()
    configs = [
        kv_config_from_dict(bench.arm_config(arm.params["tree"], 0, 10, tmp_path, tmp_path))
        for arm in bench.ARMS
    ]
    for config in configs:
        assert (
            config.learner.lr,
            config.loss.delta,
            config.trainer.steps,
            config.trainer.batch_size,
        ) == (3e-3, 0.1, 10, 32)
    assert not configs[0].distill and all(c.distill for c in configs[1:])
