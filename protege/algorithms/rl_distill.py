"""α-weighted RL + distillation (GKD §RL): maximise (1−α)·E_q[r] − α·E_q[D(p_T‖q_θ)]."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from protege.algorithms.advantages import broadcast_to_tokens, group_normalised, leave_one_out
from protege.algorithms.divergences import jsd_from_logprobs, masked_mean, sampled_reverse_kl
from protege.algorithms.policy_gradient import clipped_surrogate, sampled_logprobs
from protege.algorithms.registry import AlgorithmDefaults, ConstantPlan, check, register
from protege.algorithms.teacher_view import TeacherOutput, paired_per_token, require
from protege.records import RolloutBatch, RolloutPlan

if TYPE_CHECKING:
    from protege.student import StudentForward


class MovingBaseline:
    """Exponential moving average of the mean reward (REINFORCE's baseline)."""

    def __init__(self) -> None:
        self.value: float | None = None

    def update(self, mean_reward: float, momentum: float) -> float:
        previous = mean_reward if self.value is None else self.value
        self.value = momentum * previous + (1 - momentum) * mean_reward
        return previous


@register("rl_distill")
@dataclass(frozen=True)
class RLDistill(ConstantPlan, AlgorithmDefaults):
    """Reward policy gradient mixed with distillation by α (constant or scheduled).

    The distillation term is either the sampled-token reverse-KL advantage −(log q − log p)
    added to the reward advantage, or an analytic generalized JSD(β) added to the loss.
    """

    alpha: float = 0.5  # distillation weight α (the reward's is 1 − α)
    alpha_end: float | None = None  # scheduled towards this value over `schedule_steps`
    # α over the run: constant, or linear / cosine towards alpha_end
    # α over the run: constant, or linear / cosine towards alpha_end
    alpha_schedule: Literal["constant", "linear", "cosine"] = "constant"
    schedule_steps: int = 1000  # steps over which α reaches alpha_end
    # reward advantage: reinforce (moving baseline), group-normalised, rloo
    # reward advantage: reinforce (moving baseline), group-normalised, rloo
    estimator: Literal["reinforce", "group", "rloo"] = "group"
    samples_per_prompt: int = 4  # responses sampled per prompt (group and rloo compare them)
    baseline_momentum: float = 0.9  # reinforce: momentum of the moving reward baseline
    # sampled-token reverse-KL advantage, or analytic JSD(β) in the loss
    # sampled-token reverse-KL advantage, or analytic JSD(β) in the loss
    distill: Literal["sampled", "analytic"] = "sampled"
    beta: float = 1.0  # JSD β of the analytic distillation term
    clip_eps: float = 0.2  # PPO clipping ε of the importance ratio
    # teacher payload: top-k log-probs + tail mass, full logits, or hidden states
    teacher_output: TeacherOutput = "topk"
    topk: int = 64  # k of the top-k teacher payload
    baseline: MovingBaseline = field(
        default_factory=MovingBaseline, init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        check(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        check(self.alpha_end is None or 0 <= self.alpha_end <= 1, "alpha_end", "must be in [0, 1]")
        check(
            self.alpha_schedule == "constant" or self.alpha_end is not None,
            "alpha_end",
            f"must be set for the {self.alpha_schedule!r} schedule",
        )
        check(self.schedule_steps >= 1, "schedule_steps", "must be >= 1")
        check(self.samples_per_prompt >= 1, "samples_per_prompt", "must be >= 1")
        check(
            self.estimator == "reinforce" or self.samples_per_prompt >= 2,
            "samples_per_prompt",
            f"must be >= 2 for the {self.estimator!r} estimator",
        )
        check(0 <= self.baseline_momentum < 1, "baseline_momentum", "must be in [0, 1)")
        check(0.0 <= self.beta <= 1.0, "beta", f"must be in [0, 1], got {self.beta}")
        check(self.clip_eps > 0, "clip_eps", f"must be > 0, got {self.clip_eps}")

    def state_dict(self) -> dict[str, float | None]:
        return {"baseline": self.baseline.value}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.baseline.value = state["baseline"]

    def alpha_at(self, step: int) -> float:
        if self.alpha_schedule == "constant" or self.alpha_end is None:
            return self.alpha
        progress = min(step / self.schedule_steps, 1.0)
        if self.alpha_schedule == "cosine":
            progress = 0.5 * (1 - math.cos(math.pi * progress))
        return self.alpha + (self.alpha_end - self.alpha) * progress

    def plan(self, step: int) -> RolloutPlan:
        analytic = self.distill == "analytic"
        return RolloutPlan(
            source="student",
            teacher_need=self.teacher_output if analytic else "sampled",
            topk=self.topk,
            samples_per_prompt=self.samples_per_prompt,
        )

    def advantages(self, batch: RolloutBatch) -> RolloutBatch:
        require(batch, "rewards", "student_logprobs")
        alpha = self.alpha_at(batch.step)
        advantages = (1 - alpha) * broadcast_to_tokens(
            self._reward_advantages(batch), batch.response_mask
        )
        if self.distill == "sampled":
            require(batch, "teacher_logprobs")
            kl = sampled_reverse_kl(batch.student_logprobs, batch.teacher_logprobs, "k1")
            advantages = advantages - alpha * torch.where(batch.response_mask, kl, 0.0)
        return batch.replace(advantages=advantages)

    def _reward_advantages(self, batch: RolloutBatch) -> Tensor:
        rewards = batch.rewards.float()
        if self.estimator == "reinforce":
            baseline = self.baseline.update(rewards.mean().item(), self.baseline_momentum)
            return rewards - baseline
        require(batch, "group_ids")
        if self.estimator == "group":
            return group_normalised(rewards, batch.group_ids)
        return leave_one_out(rewards, batch.group_ids)

    def loss(self, student: StudentForward, batch: RolloutBatch) -> tuple[Tensor, dict[str, float]]:
        require(batch, "advantages", "student_logprobs")
        mask, count = batch.response_mask, batch.normaliser()
        logq = sampled_logprobs(student, batch.response_ids)
        pg = clipped_surrogate(logq, batch.student_logprobs, batch.advantages, self.clip_eps)
        loss = masked_mean(pg, mask, count)
        # alpha weighted by this micro-batch's share of the tokens: summed over micro-batches
        # and ranks, as the learner sums every metric, it reads alpha.
        share = batch.num_response_tokens / max(count, 1.0)
        metrics = {
            "rl_distill/pg_loss": loss.item(),
            "rl_distill/alpha": self.alpha_at(batch.step) * share,
        }
        if self.distill == "analytic":
            jsd = functools.partial(jsd_from_logprobs, beta=self.beta)
            divergence = paired_per_token(student, batch, jsd)
            distill = masked_mean(divergence, mask, count)
            loss = loss + self.alpha_at(batch.step) * distill
            metrics["rl_distill/divergence"] = distill.item()
        return loss, metrics
