"""DistiLLM (Ko et al., ICML 2024, arXiv 2402.03898): skew KL / skew reverse KL distillation."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from protege.algorithms.divergences import masked_mean, skew_forward_kl, skew_reverse_kl
from protege.algorithms.registry import AlgorithmDefaults, MixedPolicyPlan, check, register
from protege.algorithms.teacher_view import TeacherOutput, paired_per_token
from protege.records import RolloutBatch, RolloutPlan

SkewDivergence = Literal["skew_forward", "skew_reverse"]


@register("distillm")
@dataclass(frozen=True)
class DistiLLM(MixedPolicyPlan, AlgorithmDefaults):
    """Token-level α-skew divergence between teacher p_T and student q_θ (DistiLLM §3.1):

    * skew_forward: SKL^(α) = KL(p_T ‖ α·p_T + (1−α)·q_θ)
    * skew_reverse: SRKL^(α) = KL(q_θ ‖ (1−α)·p_T + α·q_θ)  (the paper's best, with α = 0.1)

    α = 0 recovers plain forward / reverse KL; the skew keeps the loss and its gradient
    bounded where one distribution has (almost) no mass (§3.1, Theorem 1).

    With probability `lmbda` a step trains on the student's own samples, else on dataset
    responses, as in GKD. Not implemented: DistiLLM's adaptive off-policy scheduler (§3.2),
    which raises the student-generated-output probability when the validation loss rises and
    replays student samples from a buffer; it needs a validation loop and a replay buffer
    this algorithm cannot test on its own, so `lmbda` is a fixed probability here.
    """

    # skew_reverse (SRKL, the paper's best) or skew_forward (SKL)
    # skew_reverse (SRKL, the paper's best) or skew_forward (SKL)
    divergence: SkewDivergence = "skew_reverse"
    alpha: float = 0.1  # skew α of the mixture (0: plain forward / reverse KL)
    lmbda: float = 0.5  # probability that a step trains on the student's own samples (on-policy)
    temperature: float = 1.0  # softmax temperature of both the student's and the teacher's logits
    # teacher payload: top-k log-probs + tail mass, full logits, or hidden states
    teacher_output: TeacherOutput = "topk"
    topk: int = 64  # k of the top-k teacher payload
    seed: int = 0  # seeds each step's on/off-policy draw

    def __post_init__(self) -> None:
        check(
            self.divergence in ("skew_forward", "skew_reverse"),
            "divergence",
            f"must be 'skew_forward' or 'skew_reverse', got {self.divergence!r}",
        )
        # α = 1 makes the mixture the target itself: the loss is identically 0.
        check(0.0 <= self.alpha < 1.0, "alpha", f"must be in [0, 1), got {self.alpha}")
        check(0.0 <= self.lmbda <= 1.0, "lmbda", f"must be in [0, 1], got {self.lmbda}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.topk >= 1, "topk", f"must be >= 1, got {self.topk}")

    def _plan(self, on_policy: bool) -> RolloutPlan:
        return RolloutPlan(
            source="student" if on_policy else "dataset",
            teacher_need=self.teacher_output,
            topk=self.topk,
            temperature=self.temperature,
        )

    def loss(self, student: Any, batch: RolloutBatch) -> tuple[Tensor, dict[str, float]]:
        """Token mean of the skew divergence; `student.logits` [B,T,V] predict the responses."""
        skew = skew_forward_kl if self.divergence == "skew_forward" else skew_reverse_kl
        divergence = functools.partial(skew, alpha=self.alpha)
        per_token = paired_per_token(student, batch, divergence, self.temperature)  # [B,T]
        loss = masked_mean(per_token, batch.response_mask, batch.normaliser())
        return loss, {f"distillm/{self.divergence}": loss.item()}
