"""The controller's contract, with plain in-process workers (`trainer.workers=local`): the
per-step loss object reaches the learner, learner metrics reach `observe`, adaptive state
survives a resume, every configured teacher scores in order, and the rollout queue keeps
the staleness bound."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

from protege.algorithms.divergences import masked_mean
from protege.algorithms.registry import ALGORITHMS, AlgorithmDefaults, register
from protege.config import load_config
from protege.data import PromptSource, read_jsonl
from protege.modeling import load_tokenizer
from protege.records import RolloutPlan
from protege.rollouts import RolloutQueue
from protege.run import build_controller


@dataclass
class _Scale:
    value: float = 1.0
    seen: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class ScaledNLLStep:
    """The per-step loss the learner receives: NLL of the dataset responses × `scale`."""

    scale: float

    def loss(self, student, batch):
        nll = -torch.log_softmax(student.logits, -1).gather(-1, batch.response_ids[..., None])
        loss = self.scale * masked_mean(nll[..., 0], batch.response_mask, batch.normaliser())
        share = batch.num_response_tokens / batch.normaliser()
        return loss, {"scaled/loss": loss.item(), "scaled/scale": self.scale * share}


if "scaled_nll" not in ALGORITHMS:

    @register("scaled_nll")
    @dataclass(frozen=True)
    class ScaledNLL(AlgorithmDefaults):
        """An adaptive toy: the scale halves after every step (driven by `observe`)."""

        reads_teachers: ClassVar[int] = 2
        state: _Scale = field(default_factory=_Scale, init=False, compare=False, repr=False)

        def plan(self, step: int) -> RolloutPlan:
            return RolloutPlan(source="dataset", teacher_need="sampled")

        def loss_for(self, step: int) -> ScaledNLLStep:
            return ScaledNLLStep(self.state.value)

        def loss(self, student, batch):
            return ScaledNLLStep(1.0).loss(student, batch)

        def observe(self, metrics: dict[str, float]) -> None:
            self.state.seen.append(metrics["scaled/scale"])
            self.state.value /= 2

        def state_dict(self) -> dict:
            return {"value": self.state.value}

        def load_state_dict(self, state: dict) -> None:
            self.state.value = state["value"]


def local(tmp_path, *overrides: str):
    base = [
        "algorithm.name=scaled_nll",
        "trainer.workers=local",
        "logging.wandb=disabled",
        "logging.progress=false",
        "data.test=null",
        "trainer.batch_size=4",
        f"output_dir={tmp_path}",
    ]
    return load_config(None, [*base, *overrides])


def rows(config) -> list[dict]:
    with open(f"{config.output_dir}/metrics.jsonl") as lines:
        return [r for r in map(json.loads, lines) if "learner/loss" in r]


def test_the_learner_uses_the_per_step_loss_and_observe_sees_its_metrics(tmp_path):
    controller = build_controller(local(tmp_path, "trainer.steps=3"))
    controller.run()
    assert controller.algo.state.seen == pytest.approx([1.0, 0.5, 0.25])
    assert [r["scaled/scale"] for r in rows(controller.config)] == pytest.approx([1.0, 0.5, 0.25])


def test_adaptive_state_is_checkpointed_and_resumed(tmp_path):
    whole = local(tmp_path / "whole", "trainer.steps=4")
    build_controller(whole).run()
    cut = ["trainer.save_every=2"]
    build_controller(local(tmp_path / "cut", "trainer.steps=2", *cut)).run()
    resumed = build_controller(
        local(tmp_path / "cut", "trainer.steps=4", "trainer.resume=true", *cut)
    )
    resumed.run()
    assert resumed.algo.state.seen == pytest.approx([0.25, 0.125])  # restored, not reset
    tail = [r["learner/loss"] for r in rows(resumed.config)][-2:]
    assert tail == [r["learner/loss"] for r in rows(whole)][-2:]


def test_every_teacher_scores_each_shard_in_order(tmp_path):
    controller = build_controller(
        local(
            tmp_path,
            "trainer.steps=1",
            "teachers.0.model=builtin:tiny/teacher",
            "teachers.1.name=second",
            "teachers.1.model=builtin:tiny/student",
        )
    )
    pipeline = controller.pipeline
    prompts = controller.prompts.next(0)
    plan = controller.algo.plan(0)
    scored = [
        pipeline.gather(t.score(pipeline.generate(prompts, plan), plan), prompts)
        for t in pipeline.teachers
    ]
    both = pipeline.gather(controller.rollout(0, prompts), prompts)
    # Teachers score one after another, each filing its outputs under its name (the learner
    # fuses them: protege.fusion); the standard fields stay empty until then.
    assert list(both.named_teachers) == ["teacher", "second"]
    assert torch.equal(both.named_teachers["teacher"].logprobs, scored[0].teacher_logprobs)
    assert torch.equal(both.named_teachers["second"].logprobs, scored[1].teacher_logprobs)
    assert both.teacher_logprobs is None
    assert not torch.equal(scored[0].teacher_logprobs, scored[1].teacher_logprobs)


def test_several_teachers_are_refused_for_teacher_steered_decoding(tmp_path):
    config = local(
        tmp_path,
        "algorithm.name=minillm",
        "algorithm.mix_alpha=0.2",
        "teachers.1.name=b",
        "teachers.1.model=builtin:tiny/teacher_b",
    )
    with pytest.raises(ValueError, match="teacher-steered decoding"):
        build_controller(config)


class CountingSubmit:
    def __init__(self):
        self.steps: list[int] = []

    def __call__(self, k, prompts):
        self.steps.append(k)
        return [k]


@pytest.fixture(scope="module")
def prompts_source():
    tokenizer = load_tokenizer("builtin:tiny/student")
    return lambda: PromptSource(read_jsonl("builtin:tiny/train")[:40], tokenizer, batch_size=4)


@pytest.mark.parametrize("staleness", [0, 1, 3])
def test_rollout_queue_keeps_at_most_max_staleness_steps_in_flight(staleness, prompts_source):
    submit = CountingSubmit()
    queue = RolloutQueue(submit, prompts_source(), 8, staleness, checkpoint_due=lambda k: False)
    for k in range(8):
        assert queue.take(k).shards == [k]
        queue.submit_ahead(k)
        assert sorted(queue.pending) == list(range(k + 1, min(k + staleness, 7) + 1))
    assert submit.steps == list(range(8))  # each step submitted once, in order


def test_rollout_queue_fills_past_the_end_before_a_checkpoint(prompts_source):
    submit = CountingSubmit()
    queue = RolloutQueue(submit, prompts_source(), 4, 2, checkpoint_due=lambda k: k == 3)
    for k in range(4):
        queue.take(k)
        queue.submit_ahead(k)
    assert sorted(queue.pending) == [4, 5]  # what a longer resumed run will train on
    assert not queue.drawn  # a checkpoint never holds prompts drawn but not submitted
