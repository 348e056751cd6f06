"""The experiment harness on a fake run_arm with known numbers: means, intervals, paired
p-values against brute-force sign flips, resuming, the JSON round trip and the table."""

from __future__ import annotations

import itertools
import json

import pytest

from protege.eval.harness import (
    Arm,
    ArmResult,
    compare,
    markdown_table,
    plot_curves,
    read_json,
    run_experiment,
    summarise,
    to_json,
    write_json,
)
from protege.eval.stats import bootstrap_ci

ACCURACY = {"base": [0.1, 0.2, 0.15], "better": [0.3, 0.35, 0.2], "same": [0.1, 0.2, 0.15]}
CORRECT = {  # 4 test examples per seed
    "base": [True, False, False, False],
    "better": [True, True, True, False],
    "same": [True, False, False, False],
}
ARMS = [Arm("base"), Arm("better", ("x.y=1",), "adds y"), Arm("same", params={"k": 2})]


def fake_run(calls: list | None = None):
    def run(arm: Arm, seed: int) -> ArmResult:
        if calls is not None:
            calls.append((arm.name, seed))
        accuracy = ACCURACY[arm.name][seed % 3]  # seed 3 repeats seed 0
        curve = [(0, 0.0), (10, accuracy / 2), (20, accuracy)]
        final = {"accuracy": accuracy, "loss": 1.0 - accuracy}
        return ArmResult(seed, final, list(CORRECT[arm.name]), curve, 2.0 + seed, {"tag": seed})

    return run


def sign_flip_p(a: list[float], b: list[float]) -> float:
    """Two-sided exact sign-flip p-value by enumerating every sign pattern."""
    diff = [x - y for x, y in zip(a, b)]
    observed = abs(sum(diff) / len(diff))
    flips = [
        abs(sum(s * d for s, d in zip(signs, diff)) / len(diff))
        for signs in itertools.product((-1, 1), repeat=len(diff))
    ]
    return sum(f >= observed - 1e-12 for f in flips) / len(flips)


@pytest.fixture
def results():
    return run_experiment(ARMS, [0, 1, 2], fake_run(), log=lambda _: None)


def test_every_arm_runs_every_seed_in_order(results):
    assert list(results.runs) == ["base", "better", "same"]
    assert [r.seed for r in results.runs["better"]] == [0, 1, 2]
    assert results.meta["wall_seconds"] >= 0 and "CPU cores" in results.meta["machine"]
    assert {"python", "torch", "date"} <= set(results.meta)


def test_means_intervals_and_paired_tests(results):
    base, better, same = summarise(results, ["accuracy", "loss"], baseline="base")
    assert better.metrics["accuracy"] == bootstrap_ci(ACCURACY["better"])
    assert better.metrics["accuracy"].mean == pytest.approx(sum(ACCURACY["better"]) / 3)
    assert better.metrics["loss"].mean == pytest.approx(1 - sum(ACCURACY["better"]) / 3)
    for s in (base, better, same):
        interval = s.metrics["accuracy"]
        assert interval.low <= interval.mean <= interval.high
    assert base.versus_baseline is None and base.seconds == pytest.approx(3.0)
    versus = better.versus_baseline
    assert versus.difference.mean == pytest.approx(0.4 / 3)
    assert versus.difference.low > 0 and versus.verdict == "yes"
    assert versus.p_seed == pytest.approx(sign_flip_p(ACCURACY["better"], ACCURACY["base"]))
    examples_a = [float(c) for _ in range(3) for c in CORRECT["better"]]
    examples_b = [float(c) for _ in range(3) for c in CORRECT["base"]]
    assert versus.p_example == pytest.approx(sign_flip_p(examples_a, examples_b), abs=0.02)
    assert same.versus_baseline.difference.mean == 0 and same.versus_baseline.verdict == "tie"
    assert same.versus_baseline.p_seed == 1.0


def test_comparison_pairs_only_the_seeds_both_arms_ran(results):
    results.runs["better"] = results.runs["better"][1:]
    versus = compare(results, "better", "base", "accuracy")
    a, b = ACCURACY["better"][1:], ACCURACY["base"][1:]
    assert versus.difference.mean == pytest.approx((a[0] - b[0] + a[1] - b[1]) / 2)
    assert versus.p_seed == pytest.approx(sign_flip_p(a, b))
    with pytest.raises(ValueError, match="baseline arm 'nope'"):
        summarise(results, ["accuracy"], baseline="nope")


def test_json_round_trip(results, tmp_path):
    summaries = summarise(results, ["accuracy"], baseline="base")
    path = tmp_path / "out.json"
    write_json(path, results, summaries, claims=[{"claim": "c"}])
    saved = json.loads(path.read_text())
    assert saved["claims"] == [{"claim": "c"}]
    assert [s["name"] for s in saved["summary"]] == ["base", "better", "same"]
    assert saved["summary"][1]["versus_baseline"]["p_seed"] == summaries[1].versus_baseline.p_seed
    again = read_json(path)
    assert again.arms == ARMS
    assert again.runs == results.runs  # tuples of the curves come back as tuples
    assert again.runs["better"][2].extra == {"tag": 2}
    assert summarise(again, ["accuracy"], baseline="base") == summaries
    assert to_json(again, summaries)["runs"] == saved["runs"]


def test_previous_results_are_reused_and_kept(results):
    calls: list = []
    more = run_experiment(
        [Arm("better"), Arm("base")], [0, 1, 2, 3], fake_run(calls), previous=results, log=print
    )
    assert calls == [("better", 3), ("base", 3)]  # seeds 0-2 came from the previous results
    assert list(more.runs) == ["better", "base", "same"] and len(more.runs["same"]) == 3
    assert more.meta["wall_seconds"] >= results.meta["wall_seconds"]


def test_markdown_has_every_arm_and_its_numbers(results):
    summaries = summarise(results, ["accuracy", "loss"], baseline="base")
    notes = {"better": "adds y"}
    table = markdown_table(
        summaries, ["accuracy", "loss"], "base", {"accuracy": "acc"}, {"adds": notes}
    )
    lines = table.splitlines()
    assert lines[0] == (
        "| arm | adds | acc [95% CI] | loss [95% CI] | Δ vs base [95% CI] | p (seeds) "
        "| p (examples) | seeds | wall s/run |"
    )
    assert len(lines) == 2 + len(ARMS)
    for arm, line in zip(ARMS, lines[2:]):
        assert line.startswith(f"| {arm.name} |")
    better = summaries[1]
    assert f"| adds y | {better.metrics['accuracy']} |" in lines[3] and "| +0.133 [" in lines[3]
    assert lines[3].endswith("| 3 | 3.0 |") and "| — | — | — |" in lines[2]
    plain = markdown_table(summaries, ["accuracy"]).splitlines()[0]
    assert plain == "| arm | accuracy [95% CI] | seeds | wall s/run |"


def test_curve_plot(results, tmp_path):
    pytest.importorskip("matplotlib")
    assert plot_curves(results, tmp_path / "c.png", "accuracy", "fake")
    assert (tmp_path / "c.png").stat().st_size > 1000
    results.runs = {n: [ArmResult(r.seed, r.final) for r in rs] for n, rs in results.runs.items()}
    assert not plot_curves(results, tmp_path / "none.png", "accuracy", "fake")


def test_controller_run_hands_each_step_row_to_on_step(tmp_path):
    """The hook benchmarks time steps with: the rows it sees are the ones in metrics.jsonl."""
    from protege.config import load_config
    from protege.run import build_controller

    overrides = ["trainer.workers=local", "trainer.steps=2", "trainer.batch_size=4"]
    overrides += ["rollout.max_new_tokens=4", "data.test=null", "logging.wandb=disabled"]
    config = load_config("gkd", [*overrides, "logging.progress=false", f"output_dir={tmp_path}"])
    seen: list = []
    build_controller(config).run(on_step=lambda k, row: seen.append((k, row)))
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [k for k, _ in seen] == [0, 1]
    assert [row for _, row in seen] == [r for r in written if r["step"] >= 0]
