"""The teacher colocated with the samplers (`rollout.colocate_teacher: true`): what it needs.

Each sampler holds the teacher's scorer too and scores the shard it just wrote in the same
call (`protege.actors.colocated`): one actor call per shard instead of two, no teacher actor
process (with its own torch, transformers and copy of the rollout), no object-store hop
between sampling and scoring. The sampler's teacher-steered decoding (MiniLLM's mixing,
gated rewrite, seq_kd) uses the scorer's copy, so the process holds one teacher.

It takes one token-level HF teacher next to the HF sampler; everything else is refused here,
before any model loads, naming the key to change. Import-free: read by protege.capabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from protege.config import Config
    from protege.records import RolloutPlan

KEY = "rollout.colocate_teacher"
OFF = f"or set {KEY}=false (the teacher in its own actor)"


def colocation_problem(config: Config, plans: Sequence[RolloutPlan]) -> str | None:
    """Why the teacher cannot be scored inside the samplers of `config`, or None (also when
    colocation is off)."""
    if not config.rollout.colocate_teacher:
        return None
    teachers, teacher = config.teachers, config.teachers[0]
    if len(teachers) > 1:
        return (
            f"{KEY} scores one teacher inside each sampler, but {len(teachers)} teachers are "
            f"set ({', '.join(t.name for t in teachers)}); keep one teacher, {OFF}"
        )
    if teacher.is_self:
        return (
            f"{KEY}: teacher.model: self is scored by the student's own weights (the learner, "
            "or the vLLM rollout engine), never by a teacher actor, so there is nothing to "
            f"colocate; set {KEY}=false"
        )
    if teacher.backend != "hf":
        where = "a server elsewhere" if teacher.on_server else "its own vLLM engine"
        return (
            f"{KEY} runs the HF teacher scorer inside the sampler, but teacher.backend="
            f"{teacher.backend} scores on {where}; set teacher.backend=hf, {OFF}"
        )
    if config.rollout.backend != "hf":
        return (
            f"{KEY} puts the HF teacher next to the HF sampler; with rollout.backend="
            f"{config.rollout.backend} keep the teacher in its own actor ({KEY}=false), or "
            "set rollout.backend=hf"
        )
    if teacher.num_workers != 1:
        return (
            f"{KEY}: each sampler holds one teacher replica (rollout.num_workers of them), so "
            f"teacher.num_workers={teacher.num_workers} has no meaning; set "
            f"teacher.num_workers=1 and size rollout.num_workers, {OFF}"
        )
    if any(plan.teacher_need == "kv" for plan in plans):
        return f"{KEY} scores token-level outputs; K-V teachers (kv_distill) run apart: {OFF}"
    return None
