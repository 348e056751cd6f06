"""What the vLLM backends refuse, checked at start-up without importing vLLM (unit tier)."""

from __future__ import annotations

import pytest

from protege.capabilities import teacher_problem, vllm_sampler_problem
from protege.records import RewriteSpec, RolloutPlan


@pytest.mark.parametrize(
    "plan",
    [
        RolloutPlan(mix_alpha=0.2),
        RolloutPlan(rewrite=RewriteSpec(threshold=1.0)),
        RolloutPlan(source="teacher"),
    ],
)
def test_vllm_sampler_refuses_teacher_steered_decoding_naming_hf(plan):
    reason = vllm_sampler_problem(plan)
    assert reason is not None and "rollout.backend=hf" in reason


def test_vllm_sampler_runs_plain_and_dataset_plans():
    assert vllm_sampler_problem(RolloutPlan(samples_per_prompt=4)) is None
    assert vllm_sampler_problem(RolloutPlan(source="dataset")) is None


def test_vllm_teacher_limits():
    assert teacher_problem("vllm", RolloutPlan(teacher_need="sampled")) is None
    assert teacher_problem("vllm", RolloutPlan(teacher_need="topk", topk=8)) is None
    for plan in (
        RolloutPlan(teacher_need="full"),
        RolloutPlan(teacher_need="topk", topk=8, temperature=2.0),
    ):
        assert "teacher.backend=hf" in teacher_problem("vllm", plan)
    assert teacher_problem("hf", RolloutPlan(teacher_need="full")) is None


def test_check_setup_refuses_what_a_vllm_teacher_cannot_score_before_any_model_loads():
    from protege.config import load_config
    from protege.run import check_setup

    config = load_config("gkd", ["teacher.backend=vllm", "algorithm.temperature=2.0"])
    with pytest.raises(ValueError, match="teacher.backend='vllm' cannot score.*teacher.backend=hf"):
        check_setup(config, config.build_algorithm())
    config = load_config("minillm", ["rollout.backend=vllm"])  # teacher-mixed sampling
    with pytest.raises(ValueError, match="rollout.backend='vllm' cannot run.*rollout.backend=hf"):
        check_setup(config, config.build_algorithm())


def test_self_teacher_on_vllm_needs_the_vllm_rollout_engine():
    from protege.config import load_config
    from protege.run import check_setup

    config = load_config("lora_self_distill", ["teacher.backend=vllm"])
    with pytest.raises(ValueError, match="needs rollout.backend=vllm"):
        check_setup(config, config.build_algorithm())


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["rollout.weight_sync=nccl"], "needs rollout.backend=vllm"),
        (
            ["rollout.weight_sync=nccl", "rollout.backend=vllm", "trainer.workers=local"],
            "trainer.workers=ray",
        ),
        (
            [
                "rollout.weight_sync=nccl",
                "rollout.backend=vllm",
                "trainer.workers=ray",
                "student.lora.enabled=true",
            ],
            "adapter through the object store",
        ),
    ],
)
def test_nccl_weight_sync_is_refused_where_it_cannot_run(overrides, match):
    from protege.config import load_config
    from protege.run import check_setup

    config = load_config("gkd", overrides)
    with pytest.raises(ValueError, match=match):
        check_setup(config, config.build_algorithm())
