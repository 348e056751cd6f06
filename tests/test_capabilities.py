"""Backend capabilities and refusal texts (unit tier): every refusal names the key or
backend at fault and the way out, is written once, and fires at start-up."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from protege import capabilities as cap
from protege.config import load_config
from protege.records import RewriteSpec, RolloutPlan

PACKAGE = Path(cap.__file__).resolve().parent

# Every public function of protege.capabilities that answers with a refusal text, called
# so that it refuses.
REFUSING_CALLS = {
    "unknown_backend": lambda: cap.unknown_backend("rollout", "tgi"),
    "stale_update": lambda: cap.stale_update(1, 3),
    "cannot_run": lambda: cap.cannot_run("rollout", "vllm", cap.HF_HINT),
    "vllm_cpu_head_size_problem": lambda: cap.vllm_cpu_head_size_problem("m", 16),
    "vllm_lora_rank_problem": lambda: cap.vllm_lora_rank_problem(1024),
    "hf_sampler_problem": lambda: cap.hf_sampler_problem(RolloutPlan(samples_per_prompt=0)),
    "vllm_sampler_problem": lambda: cap.vllm_sampler_problem(RolloutPlan(mix_alpha=0.5)),
    "hf_teacher_problem": None,  # the HF teacher refuses nothing
    "vllm_teacher_problem": lambda: cap.vllm_teacher_problem(RolloutPlan(teacher_need="full")),
    "server_teacher_problem": lambda: cap.server_teacher_problem(RolloutPlan(teacher_need="full")),
    "server_config_problem": lambda: cap.server_config_problem(
        load_config("gkd", ["teacher.backend=server"]), [RolloutPlan()]
    ),
    "sampler_problem": lambda: cap.sampler_problem("vllm", RolloutPlan(source="teacher")),
    "teacher_problem": lambda: cap.teacher_problem("tgi", RolloutPlan()),
    "weight_sync_problem": lambda: cap.weight_sync_problem(
        load_config("gkd", ["rollout.weight_sync=nccl"])
    ),
    "self_teacher_problem": lambda: cap.self_teacher_problem(
        load_config("gkd", ["teacher.model=self"]), [RolloutPlan()]
    ),
    "lora_problem": lambda: cap.lora_problem(
        load_config("gkd", ["rollout.backend=vllm", "student.lora.enabled=true"]).model_copy(
            update={"student": _student_with_rank(1024)}
        )
    ),
    "reward_labels_problem": lambda: cap.reward_labels_problem("reward.models.0", "rm", 2),
    "config_problem": lambda: cap.config_problem(
        load_config("gkd", ["teacher.backend=vllm"]), [RolloutPlan(teacher_need="full")]
    ),
}
REFUSAL_CONSTANTS = {
    name: value
    for name, value in vars(cap).items()
    if name.isupper() and isinstance(value, str) and name != "SELF_TEACHER"
}
# Every plan a vLLM worker refuses, to check each of their texts.
REFUSED_PLANS = {
    "vllm_sampler_problem": [
        RolloutPlan(samples_per_prompt=0),
        RolloutPlan(mix_alpha=0.2),
        RolloutPlan(rewrite=RewriteSpec(threshold=1.0)),
        RolloutPlan(source="teacher"),
    ],
    "hf_sampler_problem": [
        RolloutPlan(samples_per_prompt=0),
        RolloutPlan(mix_alpha=1.5),
        RolloutPlan(source="dataset", mix_alpha=0.5),
        RolloutPlan(rewrite=RewriteSpec(threshold=1.0, top_p=0.0)),
    ],
    "vllm_teacher_problem": [
        RolloutPlan(teacher_need="full"),
        RolloutPlan(teacher_need="hidden"),
        RolloutPlan(teacher_need="topk", topk=8, temperature=2.0),
        RolloutPlan(teacher_need="topk", topk=0),
    ],
    "server_teacher_problem": [
        RolloutPlan(teacher_need="full"),
        RolloutPlan(teacher_need="hidden"),
        RolloutPlan(teacher_need="topk", topk=8, temperature=2.0),
        RolloutPlan(teacher_need="topk", topk=0),
    ],
}
# What a refusal must name: a config key or backend, or the plan field at fault ...
KEY = re.compile(
    r"\b(rollout|teacher|student|trainer|algorithm|reward)\.[a-z_]+|samples_per_prompt|mix_alpha"
    r"|source=|teacher_need|topk|top_p|version"
)
# ... and the way out.
FIX = re.compile(
    r"\b(use|set|turn|send|lower|run it|enable|disable|must be|needs|or)\b", re.IGNORECASE
)


def _student_with_rank(r: int):
    student = load_config("gkd", ["student.lora.enabled=true"]).student
    return student.model_copy(update={"lora": student.lora.model_copy(update={"r": r})})


def _all_refusals() -> dict[str, str]:
    texts = dict(REFUSAL_CONSTANTS)
    texts.update({name: call() for name, call in REFUSING_CALLS.items() if call is not None})
    for name, plans in REFUSED_PLANS.items():
        for i, plan in enumerate(plans):
            texts[f"{name}[{i}]"] = getattr(cap, name)(plan)
    return texts


def test_every_refusing_function_is_exercised():
    answers_text = {
        name
        for name, fn in vars(cap).items()
        if inspect.isfunction(fn)
        and fn.__module__ == cap.__name__
        and not name.startswith("_")
        and inspect.signature(fn).return_annotation in ("str", "str | None")
    }
    assert answers_text == set(REFUSING_CALLS)


@pytest.mark.parametrize("name,text", sorted(_all_refusals().items()))
def test_every_refusal_names_the_key_and_the_fix(name, text):
    assert isinstance(text, str) and text, name
    assert KEY.search(text), f"{name} names no config key or plan field: {text!r}"
    assert FIX.search(text), f"{name} names no way out: {text!r}"


def test_backend_refusals_name_the_other_backend():
    for name in ("vllm_sampler_problem", "vllm_teacher_problem", "server_teacher_problem"):
        for plan in REFUSED_PLANS[name]:
            reason = getattr(cap, name)(plan)
            if "must be" not in reason and "needs plan" not in reason:
                assert cap.HF_HINT in reason, reason


def test_what_each_backend_runs():
    plain, dataset = RolloutPlan(samples_per_prompt=4), RolloutPlan(source="dataset")
    mixed = RolloutPlan(mix_alpha=0.2)
    for backend in cap.BACKENDS:
        assert cap.sampler_problem(backend, plain) is None
        assert cap.sampler_problem(backend, dataset) is None
    assert cap.sampler_problem("hf", mixed) is None
    assert cap.sampler_problem("hf", RolloutPlan(source="teacher")) is None
    assert cap.teacher_problem("hf", RolloutPlan(teacher_need="full")) is None
    assert cap.teacher_problem("vllm", RolloutPlan(teacher_need="topk", topk=8)) is None
    assert cap.teacher_problem("vllm", RolloutPlan(teacher_need="none", topk=0)) is None
    assert cap.teacher_problem("server", RolloutPlan(teacher_need="topk", topk=8)) is None
    assert set(cap.SAMPLER_PROBLEMS) == set(cap.BACKENDS)
    assert set(cap.TEACHER_PROBLEMS) == set(cap.TEACHER_BACKENDS)


def test_vllm_lora_rank_slots():
    assert cap.vllm_lora_rank_slot(8) == 8
    assert cap.vllm_lora_rank_slot(9) == 16
    with pytest.raises(ValueError, match="student.lora.r=600"):
        cap.vllm_lora_rank_slot(600)


def test_which_vllm_models_run_on_cpu():
    ray_cpu = load_config("gkd", ["rollout.backend=vllm", "teacher.backend=vllm"])
    assert cap.vllm_models_on_cpu(ray_cpu, cuda_available=True) == [
        ray_cpu.student.model,
        ray_cpu.teacher.model,
    ]
    ray_gpu = load_config("gkd", ["rollout.backend=vllm", "rollout.num_gpus=1.0"])
    assert cap.vllm_models_on_cpu(ray_gpu, cuda_available=False) == []
    local = load_config("gkd", ["rollout.backend=vllm", "trainer.workers=local"])
    assert cap.vllm_models_on_cpu(local, cuda_available=True) == []
    assert cap.vllm_models_on_cpu(local, cuda_available=False) == [local.student.model]
    assert cap.vllm_models_on_cpu(load_config("gkd", []), cuda_available=False) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the head-size limit is the CPU kernel's")
def test_check_setup_refuses_a_cpu_head_size_before_vllm_or_any_model_loads():
    from protege.run import check_setup

    config = load_config("gkd", ["rollout.backend=vllm", "trainer.workers=local"])
    with pytest.raises(ValueError, match="16 wide.*rollout.backend=hf.*student_h32"):
        check_setup(config, config.build_algorithm())
    fits = load_config(
        "gkd",
        ["rollout.backend=vllm", "trainer.workers=local", "student.model=builtin:tiny/student_h32"],
    )
    check_setup(fits, fits.build_algorithm())


def test_check_setup_refuses_a_lora_rank_vllm_cannot_serve():
    from protege.run import check_setup

    config = load_config(
        "gkd",
        [
            "rollout.backend=vllm",
            "student.lora.enabled=true",
            "student.model=builtin:tiny/student_h32",
        ],
    ).model_copy(update={"student": _student_with_rank(1024)})
    with pytest.raises(ValueError, match="student.lora.r=1024"):
        check_setup(config, config.build_algorithm())


# Refusal texts still written outside capabilities.py, in code being rewritten in parallel
# (controller/workers/learner): each entry must go once that code imports the constant.
PENDING: set[tuple[str, str]] = set()
# A fragment of each text that sits inside one string literal wherever it is written.
FRAGMENTS = {
    "NCCL_NEEDS_VLLM_ON_RAY": "broadcasts to vLLM engines",
    "NCCL_NOT_WITH_LORA": "broadcasts full weights",
    "SELF_TEACHER_NEEDS_LORA": "needs student.lora.enabled",
    "SELF_TEACHER_VLLM_NEEDS_VLLM_ROLLOUT": "scores with the rollout engine",
    "SELF_TEACHER_CANNOT_DECODE": "cannot write tokens during sampling",
    "SELF_TEACHER_HAS_NO_SCORER": "scorer is",
    "FULL_UPDATE_TO_LORA_SAMPLER": "full weight update sent",
    "LORA_UPDATE_TO_FULL_SAMPLER": "lora_only weight update needs",
    "HIDDEN_NEEDS_PLAIN_HEAD": "rebuilds the logits as head(hidden)",
    "HIDDEN_NOT_FROM_SELF_TEACHER": "saves the bytes of shipping logits",
    "HF_HINT": "use the HF backend",
    "SERVER_TEACHER_NEEDS_URL": "scores with a running OpenAI-compatible server",
    "SERVER_TEACHER_CANNOT_DECODE": "but teachers.0 is on a server",
    "stale_update": "stale weight update",
    "cannot_run": "cannot run this plan",
    "vllm_cpu_head_size_problem": "CPU attention cannot run",
    "vllm_lora_rank_problem": "largest LoRA rank",
    "unknown_backend": ".backend must be",
}


def test_every_refusal_text_is_written_once():
    assert set(REFUSAL_CONSTANTS) <= set(FRAGMENTS)
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        if relative == "protege/capabilities.py":
            continue
        source = path.read_text()
        found.update((relative, name) for name, text in FRAGMENTS.items() if text in source)
    assert found == PENDING, f"refusal texts written outside protege/capabilities.py: {found}"
