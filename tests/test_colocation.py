"""The teacher colocated with the samplers (`rollout.colocate_teacher`), in-process: a shard
sampled and scored in one sampler call carries exactly what the separate sampler and
teacher produce, on every path a shard can take (sampled, teacher-steered decoding,
dataset responses, evaluation's scoring), the run's losses are unchanged, and what cannot be
colocated is refused before any model loads. The Ray runs are in test_colocation_ray.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from protege.actors.colocated import ColocatedSampler
from protege.config import load_config
from protege.errors import ProtegeError
from protege.run import build_controller
from protege.teachers import TeacherClient

ROOT = Path(__file__).resolve().parent.parent
TEACHER_FIELDS = ("teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs")
TEACHER_FIELDS += ("teacher_tail_logprobs", "teacher_logits")


def config(preset: str, out, *overrides: str, colocate: bool):
    return load_config(
        preset,
        [
            "trainer.workers=local",
            "logging.wandb=disabled",
            "logging.progress=false",
            f"output_dir={out}",
            "trainer.batch_size=4",
            "trainer.steps=3",
            "data.test=null",
            f"rollout.colocate_teacher={str(colocate).lower()}",
            *overrides,
        ],
    )


def rollout_pair(preset: str, tmp_path, *overrides: str):
    """Step 0's scored rollout of the same prompts, separate teacher vs colocated, and the
    colocated controller."""
    batches, controllers = [], []
    for colocate in (False, True):
        controller = build_controller(
            config(preset, tmp_path / str(colocate), *overrides, colocate=colocate)
        )
        prompts = controller.prompts.next(0)
        shards = controller.rollout(0, prompts)
        batches.append(controller.pipeline.gather(shards, prompts))
        controllers.append(controller)
    return batches, controllers


def assert_same_rollout(separate, colocated) -> None:
    assert torch.equal(separate.response_ids, colocated.response_ids)
    assert torch.equal(separate.behaviour_logprobs, colocated.behaviour_logprobs)
    compared = 0
    for name in TEACHER_FIELDS:
        expected, got = getattr(separate, name), getattr(colocated, name)
        assert (expected is None) == (got is None), name
        if expected is not None:
            assert torch.equal(expected, got), name  # bitwise: the same scorer code
            compared += 1
    assert compared >= 1


@pytest.mark.parametrize(
    "preset,overrides",
    [
        ("gkd", ("algorithm.teacher_output=topk",)),  # top-k + tail
        ("gkd", ("algorithm.teacher_output=full",)),  # full logits
        ("minillm", ()),  # teacher-mixed decoding: the sampler reads the scorer's teacher
    ],
)
def test_a_colocated_shard_carries_the_separate_teachers_outputs(tmp_path, preset, overrides):
    (separate, colocated), (_, controller) = rollout_pair(preset, tmp_path, *overrides)
    assert_same_rollout(separate, colocated)
    pipeline = controller.pipeline
    client = pipeline.teachers[0]
    assert client.placement == "colocated" and client.handles is pipeline.samplers
    sampler = pipeline.samplers[0]._target
    assert isinstance(sampler, ColocatedSampler)
    if preset == "minillm":  # one teacher in the process: decoding uses the scorer's copy
        assert sampler.sampler._teacher[0] is sampler.scorer.model
    # the colocated scorer still reports its seconds and memory
    assert colocated.extras["teacher/seconds"] > 0
    assert "memory/teacher_peak_gib" in colocated.extras
    assert pipeline.take_seconds()["time/teacher"] > 0


def test_dataset_responses_and_evaluation_are_scored_by_the_colocated_scorer(tmp_path):
    """GKD with λ = 0 trains on the dataset's responses: no sampler call writes them, so the
    client sends them to the samplers' scorers; evaluation's `score` goes the same way."""
    overrides = ("algorithm.lmbda=0.0", "algorithm.teacher_output=topk")
    (separate, colocated), controllers = rollout_pair("gkd", tmp_path, *overrides)
    assert_same_rollout(separate, colocated) if separate.behaviour_logprobs is not None else None
    for name in TEACHER_FIELDS[:3]:
        assert torch.equal(getattr(separate, name), getattr(colocated, name)), name
    scored = [c.pipeline.score(separate, c.algo.plan(0)) for c in controllers]
    assert torch.equal(scored[0].teacher_topk_logprobs, scored[1].teacher_topk_logprobs)


def test_a_colocated_shard_passes_the_teacher_client_without_a_second_call(tmp_path):
    (_, _), (_, controller) = rollout_pair("gkd", tmp_path)
    pipeline = controller.pipeline
    prompts = controller.prompts.next(1)
    plan = controller.algo.plan(1)
    shards = pipeline.generate(prompts, plan)
    assert [shard.scored_by for shard in shards] == [("teacher",)]
    assert pipeline.teachers[0].score(shards, plan) == shards  # untouched: scored already
    plain = pipeline.generate(prompts, plan, score=False)  # evaluation's sampling
    assert plain[0].scored_by == ()
    assert pipeline.gather(plain, prompts).teacher_logprobs is None


@pytest.mark.parametrize("staleness", [0, 1])
def test_a_colocated_run_trains_with_the_separate_runs_losses(tmp_path, staleness):
    """Same seeds, same shards, same teacher outputs: every step's loss is the same number,
    synchronous and pipelined (each worker on its own thread)."""
    losses = []
    for colocate in (False, True):
        steps = ("trainer.steps=4", f"trainer.max_staleness={staleness}")
        run = config("gkd", tmp_path / str(colocate), *steps, colocate=colocate)
        build_controller(run).run()
        rows = (Path(run.output_dir) / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(r)["learner/loss"] for r in rows if "learner/loss" in r])
    assert len(losses[1]) == 4 and losses[0] == losses[1]


REFUSED = {
    "several teachers": (
        ("teachers.0.model=builtin:tiny/teacher", "teachers.1.name=b"),
        "2 teachers",
    ),
    "server teacher": (
        ("teacher.backend=server", "teacher.url=http://127.0.0.1:9"),
        "teacher.backend=hf",
    ),
    "vLLM teacher": (("teacher.backend=vllm",), "teacher.backend=hf"),
    "vLLM sampler": (("rollout.backend=vllm",), "rollout.backend=hf"),
    "teacher replicas": (("teacher.num_workers=2",), "teacher.num_workers=1"),
    "self teacher": (
        ("teacher.model=self", "student.lora.enabled=true"),
        "rollout.colocate_teacher=false",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_cannot_be_colocated_is_refused_before_any_model_loads(tmp_path, case, monkeypatch):
    overrides, fix = REFUSED[case]

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("protege.run.Pipeline", no_loading)
    with pytest.raises(ProtegeError, match="rollout.colocate_teacher") as refused:
        build_controller(config("gkd", tmp_path, *overrides, colocate=True))
    assert fix in str(refused.value)


def test_kv_outputs_are_refused(tmp_path):
    from protege.colocation import colocation_problem
    from protege.records import RolloutPlan

    one_teacher = config("gkd", tmp_path, colocate=True)
    assert colocation_problem(one_teacher, [RolloutPlan(teacher_need="topk")]) is None
    reason = colocation_problem(one_teacher, [RolloutPlan(teacher_need="kv")])
    assert "K-V teachers" in reason and "rollout.colocate_teacher=false" in reason
    with pytest.raises(ProtegeError, match="rollout.colocate_teacher"):  # two K-V teachers
        build_controller(config("kv_distill", tmp_path, colocate=True))


@pytest.mark.slow  # a fresh interpreter importing torch: ~10 s
def test_the_cli_prints_the_refusal_and_exits_2(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "gkd.py"),
            "rollout.colocate_teacher=true",
            "teacher.num_workers=2",
            "trainer.workers=local",
            f"output_dir={tmp_path}",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "rollout.colocate_teacher" in done.stderr and "Traceback" not in done.stderr


def test_the_client_of_a_colocated_teacher_calls_the_samplers_scorer():
    calls = []

    class Handle:
        class score:  # Ray's calling convention: handle.method.remote(...)
            @staticmethod
            def remote(shard, plan):
                calls.append(shard)
                return shard

    client = TeacherClient("teacher", "colocated", [Handle()])
    from protege.records import RolloutPlan

    assert client.score(["a", "b"], RolloutPlan(teacher_need="sampled")) == ["a", "b"]
    assert calls == ["a", "b"]


def test_rollout_dtype_casts_the_samplers_student_only(tmp_path):
    """`rollout.dtype=bfloat16` halves the sampler's copy of the student (a memory knob);
    the learner keeps float32 and its updates load into the bfloat16 copy."""
    run = config("gkd", tmp_path, "rollout.dtype=bfloat16", "trainer.steps=2", colocate=True)
    controller = build_controller(run)
    controller.run()
    sampler = controller.pipeline.samplers[0]._target.sampler
    learner = controller.pipeline.learners[0]._target
    assert {p.dtype for p in sampler.student.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in learner.model.parameters()} == {torch.float32}
    assert sampler.version == 2
    trained = dict(learner.model.named_parameters())
    for name, param in sampler.student.named_parameters():  # the last update, cast
        assert torch.equal(param, trained[name].detach().to(torch.bfloat16)), name


def test_a_checkpoint_of_a_separate_teacher_run_resumes_colocated(tmp_path):
    """Where the teacher runs is not part of the training state: a run checkpointed with its
    own teacher resumes with the teacher colocated, and its losses are the uninterrupted
    run's."""
    whole = config("gkd", tmp_path / "whole", "trainer.steps=4", colocate=False)
    build_controller(whole).run()
    cut = tmp_path / "cut"
    build_controller(
        config("gkd", cut, "trainer.steps=2", "trainer.save_every=2", colocate=False)
    ).run()
    resumed = config(
        "gkd", cut, "trainer.steps=4", "trainer.save_every=2", "trainer.resume=true", colocate=True
    )
    build_controller(resumed).run()

    def losses(out) -> list[float]:
        rows = (Path(out) / "metrics.jsonl").read_text().splitlines()
        return [json.loads(r)["learner/loss"] for r in rows if "learner/loss" in r]

    assert losses(cut) == losses(whole.output_dir)
