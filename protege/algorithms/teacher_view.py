"""Line the student's distribution up with whatever teacher output a batch carries."""

from __future__ import annotations

from torch import Tensor

from protege.algorithms.divergences import log_probs, topk_buckets
from protege.records import RolloutBatch


def paired_logprobs(
    student_logits: Tensor, batch: RolloutBatch, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """(student, teacher) log-probs on a shared support: the full vocabulary when the batch
    has teacher logits, else the teacher's top-k plus one tail bucket. [B,T,V] -> 2×[B,T,S]."""
    student_logp = log_probs(student_logits, temperature)
    if batch.teacher_logits is not None:
        _check_vocab(student_logits, batch.teacher_logits)
        return student_logp, log_probs(batch.teacher_logits, temperature)
    if batch.teacher_topk_ids is not None and batch.teacher_topk_logprobs is not None:
        return topk_buckets(
            student_logp,
            batch.teacher_topk_ids,
            batch.teacher_topk_logprobs,
            batch.teacher_tail_logprobs,
        )
    raise ValueError(
        "this loss needs the teacher's distribution, but the batch has neither teacher_logits "
        "nor teacher top-k; the algorithm's plan must ask for teacher_need='topk' or 'full'"
    )


def _check_vocab(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; teacher and student must share a vocabulary"
        )


def require(batch: RolloutBatch, *names: str) -> None:
    """Fail with the missing field names instead of a NoneType error deep inside torch."""
    missing = [name for name in names if getattr(batch, name) is None]
    if missing:
        raise ValueError(f"batch is missing {', '.join(missing)} needed by this algorithm")
