"""MiniLLM (Gu et al. 2024): reverse KL(q_θ‖p_T) minimised by policy gradient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from protege.algorithms.advantages import future_returns, whiten
from protege.algorithms.divergences import kl_from_logprobs, masked_mean
from protege.algorithms.policy_gradient import clipped_surrogate, next_token_nll, sampled_logprobs
from protege.algorithms.registry import AlgorithmDefaults, ConstantPlan, check, register
from protege.algorithms.teacher_view import TeacherOutput, paired_per_token, require
from protege.chunked import chunk_tokens_for
from protege.records import RolloutBatch, RolloutPlan

if TYPE_CHECKING:
    from protege.student import StudentForward


@register("minillm")
@dataclass(frozen=True)
class MiniLLM(ConstantPlan, AlgorithmDefaults):
    """Policy gradient on the per-token reward r_t = log p_T(y_t) − log q_θ(y_t).

    * long-term part: PPO-clipped surrogate on R_{t+1} = Σ_{i>t} γ^{i−t−1} r_i,
      length-normalised and whitened (without whitening every continuation earns a large
      negative advantage and responses collapse to a couple of tokens);
    * single-step part: the exact Σ_v q_θ(v)(log q_θ(v) − log p_T(v)) at each position,
      differentiated analytically (no sampling variance);
    * teacher-mixed sampling: tokens drawn from p̃ = α·p_T + (1−α)·q_θ, both parts weighted
      by w_t = q_θ(y_t)/p̃(y_t);
    * an LM loss on pre-training text with weight `lm_coef` (when `data.pretrain` is set):
      token-mean next-token NLL over the step's pre-training rows, from a forward of the
      student on that text (`student.forward_extra`).
    """

    mix_alpha: float = 0.2  # teacher share α of the sampling mixture α·p_T + (1−α)·q
    gamma: float = 1.0  # discount γ of the long-term return
    length_normalise: bool = True  # divide each return by the number of tokens after it
    whiten_advantages: bool = True  # whiten the long-term advantages over the batch
    clip_eps: float = 0.2  # PPO clipping ε of the importance ratio
    long_term: bool = True  # train the PPO-clipped long-term part
    single_step: bool = True  # add the exact single-step reverse-KL term
    single_step_coef: float = 1.0  # weight of the single-step term
    lm_coef: float = 1.0  # weight of the LM loss on data.pretrain
    max_importance_weight: float | None = None  # cap on w_t = q/p̃ (null: no cap)
    # teacher payload: top-k log-probs + tail mass, full logits, or hidden states
    teacher_output: TeacherOutput = "topk"
    topk: int = 64  # k of the top-k teacher payload

    def __post_init__(self) -> None:
        check(0.0 <= self.mix_alpha < 1.0, "mix_alpha", f"must be in [0, 1), got {self.mix_alpha}")
        check(0.0 <= self.gamma <= 1.0, "gamma", f"must be in [0, 1], got {self.gamma}")
        check(self.clip_eps > 0, "clip_eps", f"must be > 0, got {self.clip_eps}")
        check(self.single_step_coef >= 0, "single_step_coef", "must be >= 0")
        check(self.lm_coef >= 0, "lm_coef", f"must be >= 0, got {self.lm_coef}")
        check(self.long_term or self.single_step, "long_term", "and single_step cannot both be off")
        check(self.topk >= 1, "topk", f"must be >= 1, got {self.topk}")
        check(
            self.max_importance_weight is None or self.max_importance_weight > 0,
            "max_importance_weight",
            "must be > 0 or null",
        )

    def plan(self, step: int) -> RolloutPlan:
        return RolloutPlan(
            source="student",
            teacher_need=self.teacher_output if self.single_step else "sampled",
            topk=self.topk,
            mix_alpha=self.mix_alpha,
            pretrain_weight=self.lm_coef,
        )

    def advantages(self, batch: RolloutBatch) -> RolloutBatch:
        require(batch, "teacher_logprobs", "student_logprobs", "behaviour_logprobs")
        mask = batch.response_mask
        rewards = batch.teacher_logprobs - batch.student_logprobs  # r_t, per token
        # Without the exact single-step term, r_t belongs in the return (R_t, MiniLLM eq. 3).
        returns = future_returns(
            rewards, mask, self.gamma, self.length_normalise, include_current=not self.single_step
        )
        if self.whiten_advantages:
            returns = whiten(returns, mask)
        weights = torch.exp(batch.student_logprobs - batch.behaviour_logprobs)  # q/p̃
        if self.max_importance_weight is not None:
            weights = weights.clamp_max(self.max_importance_weight)
        weights = torch.where(mask, weights, torch.zeros_like(weights))
        return batch.replace(advantages=returns, importance_weights=weights)

    def loss(self, student: StudentForward, batch: RolloutBatch) -> tuple[Tensor, dict[str, float]]:
        require(batch, "advantages", "importance_weights", "student_logprobs")
        mask, count = batch.response_mask, batch.normaliser()
        weights = batch.importance_weights
        per_token = torch.zeros_like(weights)
        metrics: dict[str, float] = {}
        if self.long_term:
            logq = sampled_logprobs(student, batch.response_ids)
            pg = clipped_surrogate(logq, batch.student_logprobs, batch.advantages, self.clip_eps)
            per_token = per_token + weights * pg
            metrics["minillm/pg_loss"] = masked_mean(weights * pg, mask, count).item()
        if self.single_step:
            single = paired_per_token(student, batch, kl_from_logprobs)
            per_token = per_token + self.single_step_coef * weights * single
            metrics["minillm/single_step"] = masked_mean(weights * single, mask, count).item()
        loss = masked_mean(per_token, mask, count)
        if self.lm_coef > 0 and batch.pretrain_ids is not None and len(batch.pretrain_ids):
            lm = self.lm_loss(student, batch)
            loss = loss + self.lm_coef * lm
            metrics["minillm/lm_loss"] = lm.item()
        metrics["minillm/loss"] = loss.item()
        metrics["minillm/importance_weight"] = masked_mean(weights, mask, count).item()
        return loss, metrics

    @staticmethod
    def lm_loss(student: StudentForward, batch: RolloutBatch) -> Tensor:
        """This shard's share of the token-mean NLL of the step's pre-training text."""
        ids, mask = batch.pretrain_ids, batch.pretrain_mask
        logits = student.forward_extra(ids, mask)
        chunk = chunk_tokens_for(student.chunk_tokens, logits.shape[-1])
        nll = next_token_nll(logits, ids.to(logits.device), mask.to(logits.device), chunk)
        return nll / max(batch.pretrain_normaliser(), 1.0)
