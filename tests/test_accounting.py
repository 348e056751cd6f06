"""Per-phase cost accounting in every metrics row, and evaluation kept out of it."""

from __future__ import annotations

import json

import pytest
import torch

from protege.config import load_config
from protege.metrics_log import phase_accounting
from protege.run import build_controller


def local_config(tmp_path, *overrides: str):
    base = [
        "trainer.workers=local",
        "logging.wandb=disabled",
        "logging.progress=false",
        "trainer.batch_size=6",
        "trainer.eval_size=8",
        f"output_dir={tmp_path}",
    ]
    return load_config("gkd", [*base, *overrides])


def rows_of(config) -> list[dict]:
    with open(f"{config.output_dir}/metrics.jsonl") as lines:
        return [json.loads(line) for line in lines]


def test_model_time_is_the_critical_path_of_both_lanes():
    phases = {
        "time/rollout": 2.0,
        "time/teacher": 1.0,
        "time/reward": 0.5,
        "time/learner": 3.0,
        "time/step": 8.0,
    }
    sync = phase_accounting(
        phases, {"rollout/tokens": 80.0, "teacher/tokens": 40.0}, pipelined=False
    )
    assert sync["time/model"] == 6.5 and sync["time/overhead"] == 1.5
    assert sync["time/overhead_fraction"] == pytest.approx(1.5 / 8)
    assert sync["throughput/tokens_generated_per_s"] == 10.0
    assert sync["throughput/tokens_scored_per_s"] == 5.0
    piped = phase_accounting(phases, {}, pipelined=True)
    assert piped["time/model"] == 3.5 and piped["time/overhead"] == 4.5
    assert (
        phase_accounting({**phases, "time/step": 1.0}, {}, pipelined=False)["time/overhead"] == 0.0
    )


@pytest.mark.parametrize("rollout_workers", [1, 2])
def test_every_training_row_carries_the_accounting(tmp_path, rollout_workers):
    config = local_config(
        tmp_path, "trainer.steps=3", f"rollout.num_workers={rollout_workers}", "data.test=null"
    )
    build_controller(config).run()
    rows = [row for row in rows_of(config) if "learner/loss" in row]
    assert len(rows) == 3
    for row in rows:
        step = row["time/step"]
        # every stage that did work this step took time (gkd configures no reward)
        for key in ("time/rollout", "time/teacher", "time/learner", "time/sync"):
            assert 0 < row[key] < step, key
        assert row["time/reward"] == 0.0
        for key in ("time/wait_rollout", "time/wait_learner"):
            assert 0 <= row[key] < step, key
        # the documented formula: synchronous, so the lanes add up; overhead is the rest of
        # the wall time, which is positive because the workers run inside the step here
        model = row["time/rollout"] + row["time/teacher"] + row["time/reward"] + row["time/learner"]
        assert row["time/model"] == pytest.approx(model, rel=1e-9)
        assert 0 < row["time/model"] < step
        assert row["time/overhead"] == pytest.approx(step - row["time/model"], rel=1e-9)
        assert row["time/overhead_fraction"] == pytest.approx(row["time/overhead"] / step)
        assert 0.0 < row["time/overhead_fraction"] < 1.0
        # shards' totals add up, their means are weighted by rows
        assert row["rollout/tokens"] == row["learner/tokens"] == row["teacher/tokens"] > 0
        assert row["rollout/response_length"] * 6 == pytest.approx(row["rollout/tokens"])
        assert 0 < row["rollout/model_seconds"] <= row["rollout/seconds"] * rollout_workers
        assert row["throughput/tokens_generated_per_s"] == pytest.approx(
            row["rollout/tokens"] / step
        )
        assert row["throughput/tokens_scored_per_s"] == pytest.approx(row["teacher/tokens"] / step)
        assert row["teacher/payload_bytes"] > 0


def test_evaluation_is_timed_apart_from_training(tmp_path):
    config = local_config(tmp_path, "trainer.steps=2", "trainer.eval_every=1")
    controller = build_controller(config)

    class Probe:  # an evaluator that also samples and scores (as a KL evaluator would)
        def run(self, workers):
            plan = controller.algo.plan(0)
            workers.score(workers.sample(controller.prompts.next(0), plan), plan)
            return {"probe": 1.0}

    controller.evaluator = Probe()
    controller.run()
    eval_rows = [row for row in rows_of(config) if "eval/probe" in row]
    assert len(eval_rows) == 2 and all(row["time/eval"] > 0 for row in eval_rows)
    assert all(
        not key.startswith("time/") or key == "time/eval" for row in eval_rows for key in row
    )
    assert controller.pipeline.take_seconds() == {}


def test_payload_bytes_count_what_scoring_adds(tiny_dirs):
    from protege.actors.teacher import TeacherScorer, payload_bytes
    from protege.records import RolloutBatch, RolloutPlan

    batch = RolloutBatch(
        prompt_ids=torch.randint(3, 20, (2, 3)),
        prompt_mask=torch.ones(2, 3, dtype=torch.bool),
        response_ids=torch.randint(3, 20, (2, 4)),
        response_mask=torch.ones(2, 4, dtype=torch.bool),
    )
    teacher = TeacherScorer(tiny_dirs["teacher"])
    sampled = teacher.score(batch, RolloutPlan(teacher_need="sampled"))
    assert payload_bytes(sampled) == 2 * 4 * 4 == sampled.extras["teacher/payload_bytes"]
    topk = teacher.score(batch, RolloutPlan(teacher_need="topk", topk=3))
    assert payload_bytes(topk) == 2 * 4 * (4 + 3 * 8 + 3 * 4 + 4)
    assert topk.extras["teacher/tokens"] == 8 and topk.extras["teacher/seconds"] > 0
