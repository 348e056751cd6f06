"""The quality benchmark's reduced version (CI smoke test): a few arms, a few steps, one seed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("quality_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_run_writes_table_json_and_plot(tmp_path):
    quality = load_benchmark()
    assert (
        quality.main(
            ["--smoke", "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")]
        )
        == 0
    )
    out = tmp_path / "out"
    table = (out / "quality_smoke.md").read_text()
    assert "| SFT on L |" in table and "| MiniLLM (mix α=0.2) |" in table
    payload = json.loads((out / "quality_smoke.json").read_text())
    assert {s["name"] for s in payload["summary"]} == set(quality.SMOKE_ARMS)
    for runs in payload["runs"].values():
        curve = dict(runs[0]["curve"])
        assert sorted(curve) == [0, 2, 4] and all(0.0 <= a <= 1.0 for a in curve.values())
        assert len(runs[0]["correct"]) == 32
    assert [c["claim"] for c in payload["claims"]] == [
        "GKD: on-policy ≥ supervised KD",
        "GKD: supervised KD ≥ SFT",
    ]
    assert (out / "quality_smoke_curve.png").stat().st_size > 10_000


def test_data_split_keeps_labels_out_of_the_pool(tmp_path):
    quality = load_benchmark()
    paths = quality.write_data(tmp_path)
    labelled = [json.loads(line) for line in Path(paths["labelled"]).read_text().splitlines()]
    pool = [json.loads(line) for line in Path(paths["pool"]).read_text().splitlines()]
    assert len(labelled) == quality.LABELLED_ROWS and all("completion" in r for r in labelled)
    assert len(pool) == 2000 and all("completion" not in r for r in pool)
    test_file = quality.ROOT / "protege/assets/tiny/test.jsonl"
    test_prompts = {json.loads(line)["prompt"] for line in test_file.read_text().splitlines()}
    assert not test_prompts & {r["prompt"] for r in pool}
    assert len(Path(paths["text"]).read_text().splitlines()) == quality.LABELLED_ROWS
