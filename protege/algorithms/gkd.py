"""GKD (Agarwal et al. 2024) and the SFT baseline."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from protege.algorithms.cross_tokenizer import CrossTokenizer, cross_tokenizer_loss
from protege.algorithms.divergences import jsd_from_logprobs, masked_mean
from protege.algorithms.policy_gradient import sampled_logprobs
from protege.algorithms.registry import (
    AlgorithmDefaults,
    ConstantPlan,
    MixedPolicyPlan,
    check,
    register,
)
from protege.algorithms.teacher_view import TeacherOutput, paired_per_token
from protege.records import RolloutBatch, RolloutPlan

if TYPE_CHECKING:
    from protege.student import StudentForward


@register("gkd")
@dataclass(frozen=True)
class GKD(MixedPolicyPlan, AlgorithmDefaults):
    """Generalized knowledge distillation.

    With probability `lmbda` a step trains on the student's own samples (on-policy), else
    on dataset responses — or teacher-generated ones with `seq_kd`. The loss is the
    generalized JSD(β) per response token: β = 0 forward KL (λ = 0, β = 0 is supervised
    KD), β = 1 reverse KL.
    """

    lmbda: float = 0.5  # probability that a step trains on the student's own samples (on-policy)
    beta: float = 0.5  # JSD mixture weight β: 0 forward KL(p_T‖q), 1 reverse KL(q‖p_T)
    temperature: float = 1.0  # softmax temperature of both the student's and the teacher's logits
    seq_kd: bool = False  # off-policy steps train on teacher-generated responses, not the dataset's
    # teacher payload: top-k log-probs + tail mass, full logits, or hidden states
    teacher_output: TeacherOutput = "topk"
    topk: int = 64  # k of the top-k teacher payload
    seed: int = 0  # seeds each step's on/off-policy draw
    # a teacher with another tokenizer (protege.xtok): "gold" JSD(β) over exact-string
    # vocabulary pairs + a tail bucket, "uld" sorted-probability Wasserstein; on aligned spans
    cross_tokenizer: CrossTokenizer = "none"

    def __post_init__(self) -> None:
        check(0.0 <= self.lmbda <= 1.0, "lmbda", f"must be in [0, 1], got {self.lmbda}")
        check(0.0 <= self.beta <= 1.0, "beta", f"must be in [0, 1], got {self.beta}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.topk >= 1, "topk", f"must be >= 1, got {self.topk}")
        if self.cross_tokenizer != "none":
            check(
                not self.seq_kd,
                "seq_kd",
                "cannot be used with cross_tokenizer: the teacher would write in its own "
                "tokens; set seq_kd=false (off-policy steps then use the dataset's responses)",
            )
            check(
                self.teacher_output == "topk",
                "teacher_output",
                f"must be 'topk' with cross_tokenizer (the teacher ships its distribution at "
                f"aligned spans, top-k + tail), got {self.teacher_output!r}",
            )

    def _plan(self, on_policy: bool) -> RolloutPlan:
        source = "student" if on_policy else ("teacher" if self.seq_kd else "dataset")
        return RolloutPlan(
            source=source,
            teacher_need=self.teacher_output,
            topk=self.topk,
            temperature=self.temperature,
            cross_tokenizer=self.cross_tokenizer,
        )

    def loss(self, student: StudentForward, batch: RolloutBatch) -> tuple[Tensor, dict[str, float]]:
        if self.cross_tokenizer != "none":
            return cross_tokenizer_loss(
                student.logits, batch, self.cross_tokenizer, self.beta, self.temperature
            )
        jsd = functools.partial(jsd_from_logprobs, beta=self.beta)
        per_token = paired_per_token(student, batch, jsd, self.temperature)  # [B,T]
        loss = masked_mean(per_token, batch.response_mask, batch.normaliser())
        return loss, {"gkd/jsd": loss.item()}


@register("sft")
@dataclass(frozen=True)
class SFT(ConstantPlan, AlgorithmDefaults):
    """Plain next-token NLL on dataset responses (a baseline; needs no teacher)."""

    def plan(self, step: int) -> RolloutPlan:
        return RolloutPlan(source="dataset", teacher_need="none")

    def loss(self, student: StudentForward, batch: RolloutBatch) -> tuple[Tensor, dict[str, float]]:
        nll = -sampled_logprobs(student, batch.response_ids)
        loss = masked_mean(nll, batch.response_mask, batch.normaliser())
        return loss, {"sft/nll": loss.item()}
