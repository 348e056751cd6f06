"""Which worker class runs a role for a configured backend.

`hf` classes are imported eagerly; `vllm` ones only when asked for, so protege imports
and runs without vLLM installed.
"""

from __future__ import annotations

from protege.actors.sampler import HFSampler
from protege.actors.teacher import TeacherScorer
from protege.records import RolloutPlan

HF_HINT = "use the HF backend (rollout.backend=hf / teacher.backend=hf) for it"


def sampler_class(backend: str) -> type:
    if backend == "hf":
        return HFSampler
    if backend == "vllm":
        from protege.actors.vllm_sampler import VLLMSampler

        return VLLMSampler
    raise ValueError(f"rollout.backend must be 'hf' or 'vllm', not {backend!r}")


def teacher_class(backend: str) -> type:
    if backend == "hf":
        return TeacherScorer
    if backend == "vllm":
        from protege.actors.vllm_teacher import VLLMTeacherScorer

        return VLLMTeacherScorer
    raise ValueError(f"teacher.backend must be 'hf' or 'vllm', not {backend!r}")


def sampler_problem(backend: str, plan: RolloutPlan) -> str | None:
    """None when a `backend` rollout worker can run `plan`, else why not (no vLLM import)."""
    if backend == "vllm":
        return vllm_sampler_problem(plan)
    return sampler_class(backend).supports(plan)


def teacher_problem(backend: str, plan: RolloutPlan) -> str | None:
    """None when a `backend` teacher can give what `plan` needs, else why not (checked at
    start-up without importing vLLM)."""
    if backend != "vllm":
        return None
    if plan.teacher_need == "full":
        return f"teacher_need='full' (full logits) is not returned by vLLM; {HF_HINT}"
    if plan.teacher_need == "topk" and plan.temperature != 1.0:
        return (
            f"top-k at temperature {plan.temperature} needs the whole tempered distribution, "
            f"while vLLM returns log-probs at temperature 1; {HF_HINT}"
        )
    if plan.teacher_need == "topk" and plan.topk < 1:
        return f"teacher_need='topk' needs plan.topk >= 1, got {plan.topk}"
    return None


def vllm_sampler_problem(plan: RolloutPlan) -> str | None:
    """None when the vLLM sampler can run `plan`, else why not. vLLM samples each request
    from one model, so nothing that steers decoding with the teacher can run there."""
    if plan.samples_per_prompt < 1:
        return f"samples_per_prompt must be >= 1, got {plan.samples_per_prompt}"
    if plan.mix_alpha > 0:
        return (
            f"teacher-mixed sampling (mix_alpha={plan.mix_alpha}) mixes teacher and student "
            f"distributions inside decoding, which vLLM cannot do; {HF_HINT}"
        )
    if plan.rewrite is not None:
        return f"teacher rewrite inside decoding is not possible in vLLM; {HF_HINT}"
    if plan.source == "teacher":
        return (
            "source='teacher' (teacher-written responses, seq_kd) needs the teacher in the "
            f"rollout sampler, which the vLLM backend does not hold; {HF_HINT}"
        )
    return None
