"""Slow tier: faults injected into a run over Ray actors in this process, and survived.

A rollout, teacher or reward actor killed between or during steps is restarted by Ray, the
samplers get the current weights again and the shard is replayed: the run finishes every
step, and (with rollouts not run ahead) with the same losses as an uninterrupted run. A
dead learner rank stops the run with one message naming the checkpoint and the resume
command; the checkpoint resumes.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import ray

from protege.config import load_config
from protege.controller import WorkerLost
from protege.run import build_controller

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("own_ray_instance")]


def make_config(preset: str, out, *overrides: str, workers: str = "ray"):
    return load_config(
        preset,
        [
            f"trainer.workers={workers}",
            "logging.wandb=disabled",
            "logging.progress=false",
            f"output_dir={out}",
            "trainer.batch_size=2",
            "data.test=null",
            *overrides,
        ],
    )


def run_over_ray(config, on_step=None):
    controller = build_controller(config)
    try:
        controller.run(on_step=lambda k, row: on_step(controller, k, row) if on_step else None)
    finally:
        controller.pipeline.launcher.shutdown()  # frees the placement groups (and actors)
    return controller


def step_losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["learner/loss"] for row in rows if "learner/loss" in row}


def test_killed_rollout_teacher_and_reward_actors_restart_and_the_run_is_unchanged(tmp_path, capfd):
    """rl_distill has all three restartable roles: its sampler dies after step 0, its teacher
    after step 1, its rewarder after step 2 (`ray.kill` with restart). Sampling is seeded
    per step and the restarted sampler gets the current weights, so every step's loss equals
    the uninterrupted in-process run's."""
    steps = ["trainer.steps=4"]
    run_over_ray(make_config("rl_distill", tmp_path / "reference", *steps, workers="local"))

    def kill(controller, k, row):
        pipeline = controller.pipeline
        victims = {0: pipeline.samplers, 1: pipeline.teachers[0].handles, 2: pipeline.rewarders}
        if k in victims:
            ray.kill(victims[k][0], no_restart=False)

    run_over_ray(make_config("rl_distill", tmp_path / "faulty", *steps), kill)

    assert step_losses(tmp_path / "faulty") == step_losses(tmp_path / "reference")
    assert len(step_losses(tmp_path / "faulty")) == 4
    assert (tmp_path / "faulty" / "final" / "config.json").exists()
    err = capfd.readouterr().err
    for who in ("rollout worker 0 died", "teacher 'teacher' worker 0 died", "reward worker 0"):
        assert f"{who}" in err and "retrying its shard (1/3)" in err, who


def test_a_sampler_killed_with_its_shard_in_flight_is_retried(tmp_path, capfd):
    """With trainer.max_staleness=1, step k+1's rollout is in flight while step k trains: the
    sampler's process is killed then (SIGKILL of its pid), and the shard is sampled again."""

    def kill(controller, k, row):
        if k == 1:
            sampler = controller.pipeline.samplers[0]
            os.kill(ray.get(sampler.__ray_call__.remote(lambda self: os.getpid())), signal.SIGKILL)

    config = make_config("gkd", tmp_path / "run", "trainer.steps=4", "trainer.max_staleness=1")
    run_over_ray(config, kill)
    assert sorted(step_losses(tmp_path / "run")) == [0, 1, 2, 3]
    assert "rollout worker 0 died" in capfd.readouterr().err


def test_a_dead_learner_stops_the_run_with_the_resume_command_and_the_checkpoint_resumes(
    tmp_path,
):
    out = tmp_path / "run"
    common = ["trainer.steps=4", "trainer.save_every=1"]

    def kill(controller, k, row):
        if k == 1:
            ray.kill(controller.pipeline.learners[0])

    with pytest.raises(WorkerLost) as lost:
        run_over_ray(make_config("gkd", out, *common), kill)
    message = str(lost.value)
    assert "learner worker 0 died" in message
    # killed before step 1's checkpoint: the one written after step 0 is named, and resumes
    assert "stopped in step 1 (trainer.steps=4)" in message
    assert f"{out / 'checkpoints' / 'step_0000001'}, is intact" in message
    assert message.rstrip().endswith("trainer.resume=auto")

    resumed = make_config("gkd", out, *common, "trainer.resume=auto", workers="local")
    build_controller(resumed).run()
    assert sorted(step_losses(out)) == [0, 1, 2, 3]


def test_a_worker_out_of_restarts_stops_the_run_naming_the_key(tmp_path):
    def kill(controller, k, row):
        if k == 0:
            ray.kill(controller.pipeline.samplers[0], no_restart=False)

    config = make_config("gkd", tmp_path / "run", "trainer.steps=2", "trainer.worker_restarts=0")
    with pytest.raises(WorkerLost, match=r"rollout worker 0 died.*trainer.worker_restarts"):
        run_over_ray(config, kill)
