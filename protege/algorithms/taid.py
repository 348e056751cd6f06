"""TAID: Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025, arXiv 2501.16937).

The student learns from an intermediate target that moves from its own (detached)
distribution towards the teacher's as the interpolation parameter t rises (§3.1), and t
rises faster while the objective is falling fast (§3.2, Algorithm 1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from protege.algorithms.divergences import kl_from_logprobs, masked_mean
from protege.algorithms.registry import AlgorithmDefaults, ConstantPlan, check, register
from protege.algorithms.teacher_view import TeacherOutput, paired_per_token
from protege.records import RolloutBatch, RolloutPlan, Source

LOSS_METRIC = "taid/loss"


def interpolated_logprobs(student_logp: Tensor, teacher_logp: Tensor, t: float) -> Tensor:
    """log p_t = log_softmax((1−t)·log q + t·log p_T). [...,S] -> [...,S].

    §3.1 interpolates logits; log-probs differ from logits by a per-position constant, which
    the softmax removes, so the same formula applies to top-k + tail buckets (there it is
    the interpolation of the coarse-grained distributions). t = 0 and 1 are returned as is,
    so a −inf entry on the side with weight 0 does not turn 0·(−inf) into NaN.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    if t == 0.0:
        return student_logp
    if t == 1.0:
        return teacher_logp
    return torch.log_softmax((1 - t) * student_logp + t * teacher_logp, dim=-1)


def taid_divergence(student_logp: Tensor, teacher_logp: Tensor, t: float) -> Tensor:
    """J_TAID^(t) = KL(p_t ‖ q_θ) per position, p_t built from stopgrad(q_θ) (§3.1).
    [...,S] -> [...]. t = 0: 0 with zero gradient; t = 1: forward KL(p_T ‖ q_θ)."""
    target = interpolated_logprobs(student_logp.detach(), teacher_logp.detach(), t)
    return kl_from_logprobs(target, student_logp)


def next_interpolation(
    t: float,
    momentum: float,
    previous_loss: float | None,
    loss: float,
    step: int,
    *,
    total_steps: int,
    t_start: float,
    t_end: float,
    alpha: float,
    beta: float,
    adaptive: bool = True,
    eps: float = 1e-15,
) -> tuple[float, float]:
    """One adaptive update of t after the loss J^(n) of step n (§3.2, Algorithm 1):

        δ_n = (J^(n−1) − J^(n)) / (J^(n−1) + ε)         relative decrease of the objective
        m_n = β·m_{n−1} + (1−β)·δ_n                     its momentum
        t_{n+1} = min(t_end, max(t_lin(n), t_n + α·sigmoid(m_n)·(1 − t_n)))
        t_lin(n) = t_start + (t_end − t_start)·n/N      the linear floor

    Returns (t_{n+1}, m_n). Without a previous loss (the first step) nothing moves, as in
    the authors' code; `adaptive=False` is their linear-schedule ablation.
    """
    if previous_loss is None:
        return t, momentum
    relative_change = (previous_loss - loss) / (previous_loss + eps)
    momentum = beta * momentum + (1 - beta) * relative_change
    linear = t_start + (t_end - t_start) * min(step / total_steps, 1.0)
    if not adaptive:
        return linear, momentum
    increment = alpha * _sigmoid(momentum) * (1 - t)
    return min(t_end, max(linear, t + increment)), momentum


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


@dataclass(frozen=True)
class TAIDStepLoss:
    """The learner's TAID loss for one step: KL(p_t ‖ q_θ) at a fixed t."""

    t: float
    temperature: float = 1.0

    def loss(self, student: Any, batch: RolloutBatch) -> tuple[Tensor, dict[str, float]]:
        """Token mean of KL(p_t ‖ q_θ); `student.logits` [B,T,V] predict the responses."""
        divergence = functools.partial(taid_divergence, t=self.t)
        per_token = paired_per_token(student, batch, divergence, self.temperature)  # [B,T]
        loss = masked_mean(per_token, batch.response_mask, batch.normaliser())
        # t weighted by this micro-batch's share of the tokens, so the summed metric reads t.
        share = batch.num_response_tokens / max(batch.normaliser(), 1.0)
        return loss, {LOSS_METRIC: loss.item(), "taid/t": self.t * share}


@dataclass
class _TAIDState:
    """The controller's adaptive state; plain floats so it checkpoints as JSON."""

    t: float = 0.0
    momentum: float = 0.0
    previous_loss: float | None = None
    steps: int = 0  # losses observed so far = the index n of the next observed step


@register("taid")
@dataclass(frozen=True)
class TAID(ConstantPlan, AlgorithmDefaults):
    """TAID with the paper's adaptive t (defaults from the authors' code: t_start = 0.4,
    t_end = 1, α = 5e-4, β = 0.99). `total_steps` is N, the run's length, for the linear
    floor. The paper trains on dataset responses (`source: dataset`); here the default is
    the student's own samples, as everywhere in this framework.
    """

    t_start: float = 0.4  # initial teacher weight t of the interpolated target
    t_end: float = 1.0  # final t (1: the teacher itself)
    alpha: float = 5e-4  # adaptive t: step size α of each increase
    beta: float = 0.99  # adaptive t: momentum β of the loss's relative decrease
    total_steps: int = 1000  # N: the linear floor of t reaches t_end at step N
    adaptive: bool = True  # adapt t to the loss (false: the linear schedule alone)
    source: Source = "student"  # who writes the responses: student, dataset or teacher
    temperature: float = 1.0  # softmax temperature of both the student's and the teacher's logits
    # teacher payload: top-k log-probs + tail mass, full logits, or hidden states
    teacher_output: TeacherOutput = "topk"
    topk: int = 64  # k of the top-k teacher payload
    state: _TAIDState = field(default_factory=_TAIDState, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        check(0.0 <= self.t_start <= 1.0, "t_start", f"must be in [0, 1], got {self.t_start}")
        check(self.t_start <= self.t_end <= 1, "t_end", f"must be in [t_start, 1]: {self.t_end}")
        check(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        check(0.0 <= self.beta < 1.0, "beta", f"must be in [0, 1), got {self.beta}")
        check(self.total_steps >= 1, "total_steps", f"must be >= 1, got {self.total_steps}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.topk >= 1, "topk", f"must be >= 1, got {self.topk}")
        self.state.t = self.t_start

    def plan(self, step: int) -> RolloutPlan:
        return RolloutPlan(
            source=self.source,
            teacher_need=self.teacher_output,
            topk=self.topk,
            temperature=self.temperature,
        )

    def loss_for(self, step: int) -> TAIDStepLoss:
        return TAIDStepLoss(t=self.state.t, temperature=self.temperature)

    def loss(self, student: Any, batch: RolloutBatch) -> tuple[Tensor, dict[str, float]]:
        return self.loss_for(batch.step).loss(student, batch)

    def observe(self, metrics: dict[str, float]) -> None:
        """Update t from the learner's summed `taid/loss`. An empty batch (no loss metric)
        or a non-finite loss carries no measurement of the objective: the state stays."""
        if LOSS_METRIC not in metrics:
            if metrics.get("learner/empty_batch"):
                return
            raise KeyError(f"TAID needs the learner metric {LOSS_METRIC!r}; got {sorted(metrics)}")
        loss = float(metrics[LOSS_METRIC])
        if not math.isfinite(loss):
            return
        state = self.state
        state.t, state.momentum = next_interpolation(
            state.t,
            state.momentum,
            state.previous_loss,
            loss,
            state.steps,
            total_steps=self.total_steps,
            t_start=self.t_start,
            t_end=self.t_end,
            alpha=self.alpha,
            beta=self.beta,
            adaptive=self.adaptive,
        )
        state.previous_loss, state.steps = loss, state.steps + 1

    def state_dict(self) -> dict:
        return dataclasses.asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        previous = state["previous_loss"]
        self.state.t, self.state.momentum = float(state["t"]), float(state["momentum"])
        self.state.previous_loss = None if previous is None else float(previous)
        self.state.steps = int(state["steps"])
