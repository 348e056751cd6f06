"""What each backend can do, and every refusal text, in one import-free module.

The driver checks a whole run here before any model loads (`config_problem`); the workers
ask the same functions again at run time and raise the same texts. Nothing here imports
torch, vLLM, DeepSpeed or Ray: it reads plans and config values only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from protege.config import Config
    from protege.records import RolloutPlan

BACKENDS = ("hf", "vllm")
TEACHER_BACKENDS = (*BACKENDS, "server")  # server: an OpenAI-compatible server scores

# Head sizes vLLM's CPU attention kernel accepts (vllm/v1/attention/backends/cpu_attn.py).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values

# -- refusal texts: each written once, raised wherever the combination is met -------------
HF_HINT = "use the HF backend (rollout.backend=hf / teacher.backend=hf) for it"
NCCL_NEEDS_VLLM_ON_RAY = (
    "rollout.weight_sync=nccl broadcasts to vLLM engines in Ray actors; it needs "
    "rollout.backend=vllm and trainer.workers=ray (else use rollout.weight_sync=object_store)"
)
NCCL_NOT_WITH_LORA = (
    "rollout.weight_sync=nccl broadcasts full weights; a LoRA student ships only its "
    "adapter through the object store (set rollout.weight_sync=object_store)"
)
SELF_TEACHER_NEEDS_LORA = (
    "teacher.model: self (LoRA self-distillation) needs student.lora.enabled=true: the "
    "teacher is the student's base model with the adapter disabled"
)
SELF_TEACHER_VLLM_NEEDS_VLLM_ROLLOUT = (
    "teacher.model: self with teacher.backend=vllm scores with the rollout engine (adapter "
    "off), so it needs rollout.backend=vllm too (or set teacher.backend=hf)"
)
SELF_TEACHER_CANNOT_DECODE = (
    "teacher.model: self cannot write tokens during sampling (teacher-mixed sampling, "
    "rewrite, seq_kd); turn those off in the algorithm section, or set teacher.model to a "
    "separate model"
)
SELF_TEACHER_HAS_NO_SCORER = (
    "teacher.model: self (LoRA self-distillation) is scored by the student's own base model "
    "(the learner, or the vLLM rollout engine with no adapter); no teacher scorer is built "
    "for it (set teacher.model to a separate model to use one)"
)
FULL_UPDATE_TO_LORA_SAMPLER = (
    "full weight update sent to a sampler holding a LoRA adapter; send lora_only "
    "updates, or disable student.lora"
)
LORA_UPDATE_TO_FULL_SAMPLER = (
    "a lora_only weight update needs a sampler built with student.lora.enabled=true; send "
    "full updates, or enable student.lora on the learner and the samplers alike"
)
HIDDEN_NEEDS_PLAIN_HEAD = (
    "teacher_output: hidden ships the input of the teacher's output head and the learner "
    "rebuilds the logits as head(hidden), but this teacher's logits are more than that "
    "(logit softcapping or scaling after the head); use algorithm.teacher_output=full"
)
SERVER_TEACHER_NEEDS_URL = (
    "teacher.backend=server scores with a running OpenAI-compatible server: set teacher.url "
    "to its address (e.g. http://127.0.0.1:8000) and teacher.model to the name it serves the "
    "model under (not 'self': the student's own base is scored in-process)"
)
SERVER_TEACHER_CANNOT_DECODE = (
    "teacher-mixed sampling, teacher rewrite and seq_kd need the first teacher inside the "
    "rollout sampler, but teachers.0 is on a server (teacher.backend=server); turn those off "
    "in the algorithm section, or score that teacher in-process (teacher.backend=hf)"
)
HIDDEN_NOT_FROM_SELF_TEACHER = (
    "teacher_output: hidden saves the bytes of shipping logits from a separate teacher; "
    "teacher.model: self is scored by the student's own base model, so nothing is shipped "
    "(use algorithm.teacher_output=full, or set teacher.model to a separate model)"
)


def unknown_backend(role: str, backend: str) -> str:
    known = TEACHER_BACKENDS if role == "teacher" else BACKENDS
    return f"{role}.backend must be one of {list(known)}, not {backend!r}"


def stale_update(version: int, held: int) -> str:
    return (
        f"stale weight update: version {version} is older than the sampler's version {held}; "
        "send updates in learner-version order"
    )


def cannot_run(role: str, backend: str, reason: str) -> str:
    """The refusal of a plan by a `role` ('rollout' or 'teacher') worker on `backend`."""
    verb = "run" if role == "rollout" else "score"
    return f"{role}.backend={backend!r} cannot {verb} this plan: {reason}"


def reward_labels_problem(key: str, path: str, num_labels: int) -> str | None:
    """A reward model outputs one score per sequence; None when it has one label."""
    if num_labels == 1:
        return None
    return (
        f"{key}.path: {path!r} has num_labels={num_labels}; a reward model outputs one "
        "score: use a sequence-classification model saved with num_labels=1"
    )


def vllm_cpu_head_size_problem(model: str, head_dim: int) -> str | None:
    """vLLM's CPU attention supports only some head sizes; None when `head_dim` is one."""
    if head_dim in VLLM_CPU_HEAD_SIZES:
        return None
    return (
        f"vLLM's CPU attention cannot run {model!r}: its attention heads are {head_dim} wide, "
        f"and the CPU kernel supports {list(VLLM_CPU_HEAD_SIZES)}; run it on a GPU, or {HF_HINT} "
        "(on the built-in task, student.model=builtin:tiny/student_h32 has 32-wide heads)"
    )


def vllm_lora_rank_slot(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds rank `r`."""
    for slot in VLLM_LORA_RANKS:
        if slot >= r:
            return slot
    raise ValueError(vllm_lora_rank_problem(r))


def vllm_lora_rank_problem(r: int) -> str | None:
    if r <= VLLM_LORA_RANKS[-1]:
        return None
    return (
        f"student.lora.r={r} exceeds vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}; lower "
        f"student.lora.r, or {HF_HINT}"
    )


# -- rollout: what a sampler on each backend can write ------------------------------------
def hf_sampler_problem(plan: RolloutPlan) -> str | None:
    """None when the HF sampler can run `plan` (every way of writing responses), else why."""
    if plan.samples_per_prompt < 1:
        return f"samples_per_prompt must be >= 1, got {plan.samples_per_prompt}"
    if not 0.0 <= plan.mix_alpha <= 1.0:
        return f"mix_alpha must be in [0, 1], got {plan.mix_alpha}"
    if plan.source != "student" and plan.needs_teacher_in_decoding:
        return (
            "teacher-mixed sampling and teacher rewrite steer student sampling; they cannot "
            f"apply to responses from source={plan.source!r} (set source='student')"
        )
    if plan.rewrite is not None and not 0.0 < plan.rewrite.top_p <= 1.0:
        return f"rewrite top_p must be in (0, 1], got {plan.rewrite.top_p}"
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


# -- teacher: which outputs a scorer on each backend can return ---------------------------
def hf_teacher_problem(plan: RolloutPlan) -> str | None:
    """The HF teacher returns every output (sampled, top-k at any temperature, full)."""
    return None


def vllm_teacher_problem(plan: RolloutPlan) -> str | None:
    """None when a vLLM teacher can give what `plan` needs: prompt log-probs at temperature
    1, so sampled log-probs and untempered top-k, never full logits."""
    if plan.teacher_need == "full":
        return f"teacher_need='full' (full logits) is not returned by vLLM; {HF_HINT}"
    if plan.teacher_need == "hidden":
        return (
            "teacher_need='hidden' (the teacher's last hidden states) is not returned by the "
            "vLLM teacher, which scores with prompt log-probs (vLLM gives per-token hidden "
            f"states only from a separate pooling-mode engine); {HF_HINT}, or set "
            "algorithm.teacher_output=topk"
        )
    return _logprob_topk_problem(plan, "vLLM")


def _logprob_topk_problem(plan: RolloutPlan, who: str) -> str | None:
    """What top-k from prompt log-probs (always at temperature 1) cannot give `plan`."""
    if plan.teacher_need == "topk" and plan.temperature != 1.0:
        return (
            f"top-k at temperature {plan.temperature} needs the whole tempered distribution, "
            f"while {who} returns log-probs at temperature 1; {HF_HINT}"
        )
    if plan.teacher_need == "topk" and plan.topk < 1:
        return f"teacher_need='topk' needs plan.topk >= 1 (algorithm topk), got {plan.topk}"
    return None


def server_teacher_problem(plan: RolloutPlan) -> str | None:
    """A server teacher answers with prompt log-probs at temperature 1, as the in-process
    vLLM teacher: sampled log-probs and untempered top-k, never logits or hidden states."""
    if plan.teacher_need in ("full", "hidden"):
        return (
            f"teacher_need={plan.teacher_need!r} needs the teacher's logits or hidden states, "
            "which an OpenAI-compatible server does not return (it returns log-probs); set "
            f"algorithm.teacher_output=topk, or {HF_HINT}"
        )
    return _logprob_topk_problem(plan, "the server")


SAMPLER_PROBLEMS: dict[str, Callable[[RolloutPlan], str | None]] = {
    "hf": hf_sampler_problem,
    "vllm": vllm_sampler_problem,
}
TEACHER_PROBLEMS: dict[str, Callable[[RolloutPlan], str | None]] = {
    "hf": hf_teacher_problem,
    "vllm": vllm_teacher_problem,
    "server": server_teacher_problem,
}


def sampler_problem(backend: str, plan: RolloutPlan) -> str | None:
    """None when a `backend` rollout worker can run `plan`, else why not."""
    if backend not in SAMPLER_PROBLEMS:
        return unknown_backend("rollout", backend)
    return SAMPLER_PROBLEMS[backend](plan)


def teacher_problem(backend: str, plan: RolloutPlan) -> str | None:
    """None when a `backend` teacher can give what `plan` needs, else why not."""
    if backend not in TEACHER_PROBLEMS:
        return unknown_backend("teacher", backend)
    if plan.teacher_need == "none":
        return None
    return TEACHER_PROBLEMS[backend](plan)


# -- whole-run checks: every combination a run refuses, before any model loads ------------
def weight_sync_problem(config: Config) -> str | None:
    if config.rollout.weight_sync != "nccl":
        return None
    if config.rollout.backend != "vllm" or config.trainer.workers != "ray":
        return NCCL_NEEDS_VLLM_ON_RAY
    if config.student.lora.enabled:
        return NCCL_NOT_WITH_LORA
    return None


def self_teacher_problem(config: Config, plans: Sequence[RolloutPlan]) -> str | None:
    for teacher in config.teachers:
        if not teacher.is_self:
            continue
        if teacher.backend == "vllm" and config.rollout.backend != "vllm":
            return SELF_TEACHER_VLLM_NEEDS_VLLM_ROLLOUT
        if not config.student.lora.enabled and not teacher.live:  # live: the current weights
            return SELF_TEACHER_NEEDS_LORA
    if any(t.is_self for t in config.teachers) and any(p.teacher_need == "hidden" for p in plans):
        return HIDDEN_NOT_FROM_SELF_TEACHER
    decoding = any(p.needs_teacher_in_decoding or p.source == "teacher" for p in plans)
    if config.teacher.is_self and decoding:  # the first teacher steers decoding
        return SELF_TEACHER_CANNOT_DECODE
    return None


def server_config_problem(config: Config, plans: Sequence[RolloutPlan]) -> str | None:
    """`teacher.url` goes with `teacher.backend: server`, and a server cannot decode."""
    for index, teacher in enumerate(config.teachers):
        on_server = teacher.backend == "server"
        if on_server and (not teacher.url or teacher.is_self):
            return f"teachers.{index}: {SERVER_TEACHER_NEEDS_URL}"
        if teacher.url is not None and not on_server:
            return (
                f"teachers.{index}.url is read only with teacher.backend=server (it is "
                f"{teacher.backend!r}); set teachers.{index}.backend=server or drop the url"
            )
        if on_server and not teacher.url.startswith(("http://", "https://")):
            return f"teachers.{index}.url must start with http:// or https://, got {teacher.url!r}"
    decoding = any(p.needs_teacher_in_decoding or p.source == "teacher" for p in plans)
    if config.teacher.backend == "server" and decoding:
        return SERVER_TEACHER_CANNOT_DECODE
    return None


def lora_problem(config: Config) -> str | None:
    if config.student.lora.enabled and config.rollout.backend == "vllm":
        return vllm_lora_rank_problem(config.student.lora.r)
    return None


def vllm_models_on_cpu(config: Config, cuda_available: bool) -> list[str]:
    """The models vLLM workers will run on CPU: in-process workers use this process's
    device; Ray actors without GPUs see none (Ray hides the devices from them)."""
    roles = [(config.rollout, config.student.model)]
    roles += [(t, t.model) for t in config.teachers if not t.is_self]
    local = config.trainer.workers == "local"
    return [
        model
        for role, model in roles
        if role.backend == "vllm" and (not cuda_available if local else role.num_gpus == 0)
    ]


def config_problem(config: Config, plans: Sequence[RolloutPlan]) -> str | None:
    """The first reason `config` cannot run the algorithm's `plans`, or None."""
    for plan in plans:
        reason = sampler_problem(config.rollout.backend, plan)
        if reason:
            return cannot_run("rollout", config.rollout.backend, reason)
        for teacher in config.teachers:
            reason = teacher_problem(teacher.backend, plan)
            if reason:
                return cannot_run("teacher", teacher.backend, reason)
    from protege.colocation import colocation_problem  # import-free, like this module

    return (
        weight_sync_problem(config)
        or self_teacher_problem(config, plans)
        or lora_problem(config)
        or server_config_problem(config, plans)
        or colocation_problem(config, plans)
    )
