"""The A/B runner: summaries and the table from given scores, and the CLI end to end."""

from __future__ import annotations

import json

import pytest

from protege.eval.ab import format_table, main, seed_overrides, summarize
from protege.eval.stats import bootstrap_ci, paired_test


def test_summaries_use_the_stats_functions_and_pair_by_seed():
    results = {"base": [0.1, 0.2, 0.15], "new": [0.3, 0.35, 0.2]}
    base, new = summarize(results, baseline="base")
    assert base.versus_baseline is None and base.p_value is None
    assert new.mean == bootstrap_ci(results["new"])
    paired = paired_test(results["new"], results["base"])
    assert new.versus_baseline == paired.difference and new.p_value == paired.p_value
    table = format_table([base, new], "accuracy", "base")
    lines = table.splitlines()
    assert lines[0].startswith("| arm | accuracy mean [95% CI] | Δ vs base")
    assert lines[3].startswith(f"| new | {new.mean} | +0.133 [") and lines[3].endswith(
        f"| {new.p_value:.3f} | 3 |"
    )


def test_unknown_baseline_and_unequal_seeds_are_refused():
    with pytest.raises(ValueError, match="baseline arm 'x'"):
        summarize({"a": [1.0]}, baseline="x")
    with pytest.raises(ValueError, match="equal lengths"):
        summarize({"a": [1.0, 2.0], "b": [1.0]}, baseline="a")


def test_seed_overrides_reach_the_algorithm_only_when_it_has_a_seed():
    assert "algorithm.seed=3" in seed_overrides("gkd", 3)
    assert seed_overrides("sft", 3) == ["trainer.seed=3", "data.shuffle_seed=3"]


def test_cli_runs_arms_over_seeds_and_prints_the_table(tmp_path, capsys):
    common = [
        "trainer.steps=1",
        "trainer.batch_size=4",
        "trainer.eval_size=8",
        "rollout.max_new_tokens=4",
    ]
    out = tmp_path / "ab.json"
    code = main(
        [
            "--arm",
            "on",
            "gkd",
            "algorithm.lmbda=1",
            "--arm",
            "kd",
            "gkd",
            "algorithm.lmbda=0",
            "--seeds",
            "2",
            "--set",
            *common,
            "--output-dir",
            str(tmp_path),
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| kd |" in printed and "Δ vs on" in printed
    payload = json.loads(out.read_text())
    assert [r["seed"] for r in payload["runs"]["kd"]] == [0, 1]
    assert (tmp_path / "kd" / "seed1" / "final").is_dir()


def test_cli_bad_input(tmp_path, capsys):
    assert main([]) == 2
    assert main(["--arm", "only-a-label"]) == 2
    assert main(["gkd", "--baseline", "nope"]) == 2
    assert main(["no_such_preset", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--arm needs LABEL PRESET" in err and "no preset 'no_such_preset'" in err
