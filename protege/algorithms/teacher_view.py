"""Line the student's distribution up with whatever teacher output a batch carries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from torch import Tensor

from protege.algorithms.divergences import log_probs, topk_buckets
from protege.chunked import student_per_token
from protege.records import RolloutBatch

# How an algorithm over the teacher's distribution asks for it (its `teacher_output` field):
# top-k + tail, full logits, or the teacher's last hidden states, which the learner decodes
# into the exact full logits with a frozen copy of the teacher's head before the loss runs.
TeacherOutput = Literal["topk", "full", "hidden"]


def paired_logprobs(
    student_logits: Tensor, batch: RolloutBatch, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """(student, teacher) log-probs on a shared support: the full vocabulary when the batch
    has teacher logits, else the teacher's top-k plus one tail bucket. [B,T,V] -> 2×[B,T,S]."""
    return paired_from(student_logits, *teacher_distribution(batch), temperature=temperature)


def paired_per_token(
    student: Any, batch: RolloutBatch, fn: Callable[..., Any], temperature: float = 1.0
) -> Any:
    """fn(student_logp, teacher_logp) -> [B,T] tensor(s) on the pair `paired_logprobs`
    gives, a block of positions at a time (`protege.chunked`: the [B,T,S]
    log-probs of one block are alive at once, not the batch's)."""
    teacher = teacher_distribution(batch)
    if teacher[0] is not None:
        _same_positions(student.logits, teacher[0])
    return student_per_token(
        student,
        lambda logits, *payload: fn(*paired_from(logits, *payload, temperature=temperature)),
        *teacher,
    )


def teacher_distribution(batch: RolloutBatch) -> tuple[Tensor | None, ...]:
    """The teacher's distribution a batch carries: (logits [B,T,V], None, None, None), or
    (None, top-k ids [B,T,K], top-k log-probs [B,T,K], tail log-prob [B,T] or None)."""
    if batch.teacher_logits is not None:
        return batch.teacher_logits, None, None, None
    if batch.teacher_topk_ids is not None and batch.teacher_topk_logprobs is not None:
        return (
            None,
            batch.teacher_topk_ids,
            batch.teacher_topk_logprobs,
            batch.teacher_tail_logprobs,
        )
    if batch.teacher_hidden is not None:
        raise ValueError(
            "the batch carries teacher hidden states that no teacher head decoded; the "
            "learner decodes them (protege.teacher_head.TeacherHead.decode) before the loss"
        )
    raise ValueError(
        "this loss needs the teacher's distribution, but the batch has neither teacher_logits "
        "nor teacher top-k; the algorithm's plan must ask for teacher_need='topk', 'full' or "
        "'hidden'"
    )


def paired_from(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    topk_ids: Tensor | None,
    topk_logprobs: Tensor | None,
    tail_logprobs: Tensor | None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """`paired_logprobs` on the fields `teacher_distribution` returns (or a block of them)."""
    if teacher_logits is not None:
        student_logits, teacher_logits = shared_vocabulary(student_logits, teacher_logits)
        return log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    student_logp = log_probs(student_logits, temperature)
    return topk_buckets(student_logp, topk_ids, topk_logprobs, tail_logprobs)


def shared_vocabulary(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Both logits cut to their common width.

    Models that share a tokenizer often pad their embedding matrices to different sizes
    (e.g. 151936 vs 152064 rows); the extra rows are ids no tokenizer emits, so they are
    dropped and each distribution renormalises over the shared ids.
    """
    _same_positions(student_logits, teacher_logits)
    width = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :width], teacher_logits[..., :width]


def _same_positions(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} cover different positions"
        )


def require(batch: RolloutBatch, *names: str) -> None:
    """Fail with the missing field names instead of a NoneType error deep inside torch."""
    missing = [name for name in names if getattr(batch, name) is None]
    if missing:
        raise ValueError(f"batch is missing {', '.join(missing)} needed by this algorithm")
