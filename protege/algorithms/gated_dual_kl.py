"""Gated dual-KL distillation (seed 003): reverse KL where the student is close to the
teacher, forward KL (and optionally a teacher rewrite) where it has drifted away."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from protege.algorithms.divergences import kl_from_logprobs, masked_mean
from protege.algorithms.registry import AlgorithmDefaults, ConstantPlan, check, register
from protege.algorithms.teacher_view import TeacherOutput, paired_per_token
from protege.records import RewriteSpec, RolloutBatch, RolloutPlan, TokenSource

if TYPE_CHECKING:
    from protege.student import StudentForward


@register("gated_dual_kl")
@dataclass(frozen=True)
class GatedDualKL(ConstantPlan, AlgorithmDefaults):
    """D_t = KL(q_θ‖p_T) per token or per reasoning step (tokens up to `step_delimiter_id`);
    gate λ_t = 1[D_t < τ] (hard) or σ(a·(τ − D_t)) (soft); loss λ_t·KL(q‖p) + (1−λ_t)·KL(p‖q).
    Tokens the teacher rewrote during sampling always take forward KL."""

    tau: float = 1.0  # gate threshold τ on D_t = KL(q‖p_T): below it reverse KL, above forward
    gate: Literal["hard", "soft"] = "soft"  # hard: λ_t = 1[D_t < τ]; soft: λ_t = σ(a·(τ − D_t))
    sharpness: float = 5.0  # a in σ(a·(τ − D))
    # gate per token, or per reasoning step (tokens up to the delimiter)
    # gate per token, or per reasoning step (tokens up to the delimiter)
    granularity: Literal["token", "step"] = "token"
    step_delimiter_id: int | None = None  # token id that ends a reasoning step (granularity=step)
    clip_kl: float | None = None  # clip D_t at this value before gating (null: no clip)
    support_topk: int | None = None  # compute both KLs on the teacher's top-k support only
    rewrite: bool = True  # the teacher re-samples steps with D_t ≥ τ during generation
    # a rewritten step: the teacher's argmax, or a nucleus sample
    # a rewritten step: the teacher's argmax, or a nucleus sample
    rewrite_mode: Literal["argmax", "nucleus"] = "argmax"
    rewrite_top_p: float = 0.9  # nucleus mass of a rewrite (rewrite_mode=nucleus)
    temperature: float = 1.0  # softmax temperature of both the student's and the teacher's logits
    # teacher payload: top-k log-probs + tail mass, full logits, or hidden states
    teacher_output: TeacherOutput = "topk"
    topk: int = 64  # k of the top-k teacher payload

    def __post_init__(self) -> None:
        check(self.tau > 0, "tau", f"must be > 0, got {self.tau}")
        check(self.sharpness > 0, "sharpness", f"must be > 0, got {self.sharpness}")
        check(
            self.granularity == "token" or self.step_delimiter_id is not None,
            "step_delimiter_id",
            "must be set when granularity is 'step'",
        )
        check(self.clip_kl is None or self.clip_kl > 0, "clip_kl", "must be > 0 or null")
        check(self.support_topk is None or self.support_topk >= 1, "support_topk", "must be >= 1")
        check(0 < self.rewrite_top_p <= 1, "rewrite_top_p", "must be in (0, 1]")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.topk >= 1, "topk", f"must be >= 1, got {self.topk}")

    def plan(self, step: int) -> RolloutPlan:
        rewrite = None
        if self.rewrite:
            delimiter = self.step_delimiter_id if self.granularity == "step" else None
            rewrite = RewriteSpec(self.tau, self.rewrite_mode, self.rewrite_top_p, delimiter)
        return RolloutPlan(
            source="student",
            teacher_need=self.teacher_output,
            topk=self.topk,
            temperature=self.temperature,
            rewrite=rewrite,
        )

    def loss(self, student: StudentForward, batch: RolloutBatch) -> tuple[Tensor, dict[str, float]]:
        mask, count = batch.response_mask, batch.normaliser()
        both = functools.partial(self._both_kls, topk_buckets=batch.teacher_logits is None)
        reverse, forward = paired_per_token(student, batch, both, self.temperature)  # [B,T] each
        distance = self._distance(reverse.detach(), batch)
        easy = self._gate(distance)
        if batch.token_source is not None:
            easy = torch.where(batch.token_source == TokenSource.TEACHER, 0.0, easy)
        per_token = easy * reverse + (1 - easy) * forward
        loss = masked_mean(per_token, mask, count)
        return loss, {
            "gated/loss": loss.item(),
            "gated/hard_fraction": masked_mean(1 - easy, mask, count).item(),
            "gated/distance": masked_mean(distance, mask, count).item(),
            "gated/reverse_part": masked_mean(easy * reverse, mask, count).item(),
            "gated/forward_part": masked_mean((1 - easy) * forward, mask, count).item(),
        }

    def _both_kls(
        self, student_logp: Tensor, teacher_logp: Tensor, topk_buckets: bool
    ) -> tuple[Tensor, Tensor]:
        """(KL(q‖p_T), KL(p_T‖q)) per position, on the teacher's top `support_topk` entries
        when set. [...,S] -> 2×[...]."""
        if self.support_topk is not None:
            if topk_buckets:  # top-k buckets: the last one is the tail, not a token
                student_logp, teacher_logp = student_logp[..., :-1], teacher_logp[..., :-1]
            student_logp, teacher_logp = restrict_to_teacher_support(
                student_logp, teacher_logp, self.support_topk
            )
        reverse = kl_from_logprobs(student_logp, teacher_logp)
        return reverse, kl_from_logprobs(teacher_logp, student_logp)

    def _distance(self, reverse: Tensor, batch: RolloutBatch) -> Tensor:
        if self.clip_kl is not None:
            reverse = reverse.clamp_max(self.clip_kl)
        if self.granularity == "step":
            delimiters = batch.response_ids == self.step_delimiter_id
            reverse = step_means(reverse, batch.response_mask, delimiters)
        return reverse

    def _gate(self, distance: Tensor) -> Tensor:
        if self.gate == "hard":
            return (distance < self.tau).to(distance.dtype)
        return torch.sigmoid(self.sharpness * (self.tau - distance))


def step_means(values: Tensor, mask: Tensor, delimiters: Tensor) -> Tensor:
    """Every token gets the mean of `values` over its step; a step ends with (and includes)
    a delimiter token. Masked tokens take no part. [B,T] -> [B,T]."""
    step_index = delimiters.long().cumsum(-1) - delimiters.long()  # [B,T]
    num_steps = int(step_index.max()) + 1 if step_index.numel() else 1
    flat = step_index + torch.arange(values.shape[0]).unsqueeze(-1) * num_steps
    kept = torch.where(mask.bool(), values, torch.zeros_like(values))
    sums = torch.zeros(values.shape[0] * num_steps, dtype=values.dtype)
    sums.scatter_add_(0, flat.flatten(), kept.flatten())
    counts = torch.zeros_like(sums).scatter_add_(0, flat.flatten(), mask.flatten().to(values.dtype))
    return (sums / counts.clamp_min(1.0))[flat]


def restrict_to_teacher_support(
    student_logp: Tensor, teacher_logp: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Both distributions renormalised on the teacher's k most likely entries. [B,T,S] -> [B,T,k]."""
    ids = teacher_logp.topk(min(k, teacher_logp.shape[-1]), dim=-1).indices
    student = student_logp.gather(-1, ids)
    teacher = teacher_logp.gather(-1, ids)
    return (
        student - torch.logsumexp(student, -1, keepdim=True),
        teacher - torch.logsumexp(teacher, -1, keepdim=True),
    )
