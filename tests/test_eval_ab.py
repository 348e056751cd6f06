"""The A/B runner's CLI end to end (its summaries and table are the harness's: test_harness)."""

from __future__ import annotations

import json

from protege.eval.ab import main, seed_overrides


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
