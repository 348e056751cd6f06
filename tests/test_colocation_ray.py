"""Slow tier: the teacher colocated with the samplers over Ray actors (a protege-started Ray
instance in this process). No teacher actor or process exists, a shard carries the same
teacher outputs as the separate teacher's, the run trains with the same losses as the
in-process separate-teacher run, and a sampler killed mid-run is restarted, sent the
current weights and its shard replayed (sampling and scoring again, in one call)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest
import ray
import torch

from protege.config import load_config
from protege.modeling import resolve_path
from protege.run import build_controller

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("own_ray_instance")]
TEACHER_FIELDS = ("teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs")


def make_config(out, *overrides: str, workers: str = "ray", colocate: bool = True):
    return load_config(
        "gkd",
        [
            f"trainer.workers={workers}",
            f"rollout.colocate_teacher={str(colocate).lower()}",
            "logging.wandb=disabled",
            "logging.progress=false",
            f"output_dir={out}",
            "trainer.batch_size=4",
            "data.test=null",
            *overrides,
        ],
    )


def step_losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["learner/loss"] for row in rows if "learner/loss" in row]


def actor_processes() -> list[str]:
    """Process titles of this machine's Ray actor workers started by this Ray instance."""
    node = ray._private.worker.global_worker.node
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    titles = []
    for child in raylet.children(recursive=True):
        try:
            titles.append(" ".join(child.cmdline()))
        except psutil.NoSuchProcess:
            continue
    return [t for t in titles if t.startswith("ray::") and "Agent" not in t]


def first_rollout(config):
    controller = build_controller(config)
    try:
        prompts = controller.prompts.next(0)
        batch = controller.pipeline.gather(controller.rollout(0, prompts), prompts)
        return batch, controller, actor_processes()
    finally:
        if config.trainer.workers == "ray":
            controller.pipeline.launcher.shutdown()


def test_a_colocated_ray_shard_equals_the_separate_teachers_and_no_teacher_actor_runs(tmp_path):
    separate, _, _ = first_rollout(make_config(tmp_path / "a", workers="local", colocate=False))
    colocated, controller, processes = first_rollout(make_config(tmp_path / "b"))
    assert torch.equal(separate.response_ids, colocated.response_ids)
    for name in TEACHER_FIELDS:
        assert torch.equal(getattr(separate, name), getattr(colocated, name)), name
    roles = {role for role, _ in controller.pipeline.launcher._actors.values()}
    assert roles == {"learner", "rollout"}  # no `teacher-<name>` actor was spawned
    assert any(title.startswith("ray::ColocatedSampler") for title in processes), processes
    assert not any("TeacherScorer" in title for title in processes), processes
    assert not any(title.startswith("ray::IDLE") for title in processes), processes  # no prestart
    assert colocated.extras["teacher/seconds"] > 0


def test_a_colocated_ray_run_trains_and_survives_a_killed_sampler(tmp_path, capfd):
    """The sampler (which holds the teacher) dies after step 0 (`ray.kill` with restart) and
    is SIGKILLed again after step 2: every step's loss still equals the uninterrupted
    in-process separate-teacher run's, and the loss on the 8 prompts it trains on falls."""
    rows = (Path(resolve_path("builtin:tiny/train")).read_text().splitlines())[:8]
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")  # the same 8 prompts each step
    steps = ["trainer.steps=6", "trainer.batch_size=8", f"data.train={tmp_path / 'rows.jsonl'}"]
    reference = tmp_path / "reference"
    build_controller(make_config(reference, *steps, workers="local", colocate=False)).run()

    def kill(controller, k, row):
        sampler = controller.pipeline.samplers[0]
        if k == 0:
            ray.kill(sampler, no_restart=False)
        if k == 2:
            pid = ray.get(sampler.__ray_call__.remote(lambda self: os.getpid()))
            os.kill(pid, signal.SIGKILL)

    controller = build_controller(make_config(tmp_path / "faulty", *steps))
    try:
        controller.run(on_step=lambda k, row: kill(controller, k, row))
    finally:
        controller.pipeline.launcher.shutdown()
    losses = step_losses(tmp_path / "faulty")
    assert losses == step_losses(reference) and len(losses) == 6
    assert sum(losses[3:]) < sum(losses[:3])  # it learns: the loss on these prompts falls
    err = capfd.readouterr().err
    assert "rollout worker 0 died" in err and "retrying its shard (1/3)" in err
    assert "teacher 'teacher' worker" not in err  # there is no teacher actor to die
