"""TAID (Shing et al., ICLR 2025): interpolated target, its KL, the adaptive t and the state."""

from __future__ import annotations

import itertools
import json
import math
import pickle
import random
from types import SimpleNamespace

import pytest
import torch

from protege.algorithms.divergences import kl_from_logprobs, log_probs, topk_buckets
from protege.algorithms.registry import FieldError
from protege.algorithms.taid import (
    LOSS_METRIC,
    TAID,
    TAIDStepLoss,
    interpolated_logprobs,
    next_interpolation,
    taid_divergence,
)
from protege.records import RolloutBatch, RolloutPlan

HYPER = {"total_steps": 100, "t_start": 0.4, "t_end": 1.0, "alpha": 5e-4, "beta": 0.99}


def logits_pair(seed: int = 0, shape=(2, 3, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, generator=generator, dtype=torch.float64)
    teacher = 2.0 * torch.randn(*shape, generator=generator, dtype=torch.float64)
    return student, teacher


def brute_taid(student_logits, teacher_logits, t: float) -> torch.Tensor:
    """Loops: p_t = softmax((1−t)·logit_s + t·logit_T) on raw logits, then Σ p_t log(p_t/q)."""
    out = torch.zeros(student_logits.shape[:-1], dtype=torch.float64)
    for index in itertools.product(*map(range, student_logits.shape[:-1])):
        s, p = student_logits[index].tolist(), teacher_logits[index].tolist()
        mixed = [math.exp((1 - t) * si + t * pi if t else si) for si, pi in zip(s, p)]
        target = [m / sum(mixed) for m in mixed]
        q = [math.exp(si) / sum(math.exp(x) for x in s) for si in s]
        out[index] = sum(ti * math.log(ti / qi) for ti, qi in zip(target, q) if ti > 0)
    return out


@pytest.mark.parametrize("t", [0.0, 0.2, 0.7, 1.0])
@pytest.mark.parametrize("teacher_zeros", [False, True])
def test_divergence_matches_the_logit_interpolation_brute_force(t, teacher_zeros):
    student, teacher = logits_pair(seed=1)
    if teacher_zeros:  # −inf teacher logits (zero mass) on every third token of the vocabulary
        teacher[..., ::3] = -math.inf
    student.requires_grad_(True)
    value = taid_divergence(log_probs(student), log_probs(teacher), t)
    expected = brute_taid(student.detach(), teacher, t)
    torch.testing.assert_close(value.detach(), expected, rtol=1e-10, atol=1e-12)
    value.sum().backward()
    assert value.isfinite().all() and student.grad.isfinite().all()


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_endpoints_and_the_gradient_of_a_frozen_target(t):
    """t = 0 gives 0, t = 1 forward KL; the target is built from stopgrad(q_θ), so the
    gradient w.r.t. the logits is q_θ − p_t (closed form, and gradcheck on the frozen KL)."""
    student, teacher = logits_pair(seed=3)
    student.requires_grad_(True)
    teacher_logp = log_probs(teacher)
    value = taid_divergence(log_probs(student), teacher_logp, t)
    if t in (0.0, 1.0):
        expected = kl_from_logprobs(teacher_logp, log_probs(student)) if t else 0 * value
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=0.0)
    (grad,) = torch.autograd.grad(value.sum(), student)
    target = interpolated_logprobs(log_probs(student.detach()), teacher_logp, t)
    torch.testing.assert_close(grad, torch.softmax(student.detach(), -1) - target.exp())
    assert torch.autograd.gradcheck(lambda x: kl_from_logprobs(target, log_probs(x)), (student,))
    assert t > 0 or grad.abs().max() < 1e-15


# ---------------------------------------------------------------- the adaptive t


def run(losses: list[float], **overrides) -> list[float]:
    """t after each observed loss, starting from t_start with no previous loss."""
    t, momentum, previous, trajectory = 0.4, 0.0, None, []
    for step, loss in enumerate(losses):
        t, momentum = next_interpolation(t, momentum, previous, loss, step, **HYPER | overrides)
        previous, trajectory = loss, [*trajectory, t]
    return trajectory


def test_update_follows_algorithm_1_by_hand():
    t, momentum = next_interpolation(0.5, 0.2, 2.0, 1.5, 10, **HYPER)
    expected_momentum = 0.99 * 0.2 + 0.01 * (2.0 - 1.5) / 2.0  # β·m + (1−β)·δ
    assert momentum == pytest.approx(expected_momentum, rel=1e-12)
    assert t == pytest.approx(0.5 + 5e-4 / (1 + math.exp(-expected_momentum)) * 0.5, rel=1e-12)
    assert next_interpolation(0.5, 0.2, None, 1.5, 0, **HYPER) == (0.5, 0.2)  # first step


def test_t_is_monotone_bounded_and_never_below_the_linear_floor():
    generator = random.Random(0)
    for _ in range(50):
        losses = [generator.uniform(0.01, 5.0) for _ in range(130)]  # runs past total_steps
        trajectory = run(losses, alpha=generator.choice([5e-4, 0.05, 0.5]))
        assert all(b >= a for a, b in itertools.pairwise(trajectory))
        assert all(t <= HYPER["t_end"] for t in trajectory)
        for step, t in enumerate(trajectory[1:], start=1):
            assert t >= 0.4 + 0.6 * min(step / 100, 1.0) - 1e-12
        assert trajectory[-1] == HYPER["t_end"]


def test_falling_loss_raises_t_faster_and_the_linear_ablation():
    falling = run([1.0 * 0.9**n for n in range(30)], total_steps=10_000, alpha=0.05)
    rising = run([1.0 * 1.1**n for n in range(30)], total_steps=10_000, alpha=0.05)
    flat = run([1.0] * 30, total_steps=10_000, alpha=0.05)
    assert falling[-1] > flat[-1] > rising[-1] > 0.4
    # with a flat loss the momentum stays 0: each step closes α·sigmoid(0) = α/2 of the gap
    assert 1 - flat[-1] == pytest.approx(0.6 * (1 - 0.025) ** 29, rel=1e-9)
    # the linear-schedule ablation, and a loss jump that would overflow a naive sigmoid
    trajectory = run([1.0, 0.5, 3.0, 0.1, 0.1], adaptive=False, total_steps=4)
    assert trajectory == [0.4, pytest.approx(0.55), pytest.approx(0.7), 0.85, 1.0]
    t, momentum = next_interpolation(0.4, -1e6, 1e-9, 1e9, 1, **HYPER)  # sigmoid(−huge)
    assert math.isfinite(momentum) and t == pytest.approx(0.4 + 0.6 / 100)


# ---------------------------------------------------------------- the algorithm


def make_batch(seed: int = 0, topk: int | None = None):
    student, teacher = logits_pair(seed=seed, shape=(3, 4, 7))
    fields: dict = {"teacher_logits": teacher}
    if topk is not None:
        values, ids = log_probs(teacher).topk(topk, dim=-1)
        fields = {"teacher_topk_ids": ids, "teacher_topk_logprobs": values}
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    ids = torch.zeros(3, 4, dtype=torch.long)
    batch = RolloutBatch(ids[:, :2], torch.ones(3, 2, dtype=torch.bool), ids, mask, **fields)
    return student.requires_grad_(True), teacher, batch


def test_step_loss_is_the_token_mean_and_its_metrics_add_up():
    student, teacher, batch = make_batch(seed=4)
    step_loss = TAIDStepLoss(t=0.6)
    loss, metrics = step_loss.loss(SimpleNamespace(logits=student), batch)
    expected = brute_taid(student.detach(), teacher, 0.6)[batch.response_mask].mean()
    torch.testing.assert_close(loss.detach(), expected)
    total = batch.num_response_tokens
    parts = [
        step_loss.loss(SimpleNamespace(logits=student[rows]), part.replace(token_count=total))[1]
        for rows, part in [(slice(0, 1), batch.select([0])), (slice(1, 3), batch.select([1, 2]))]
    ]
    assert sum(m[LOSS_METRIC] for m in parts) == pytest.approx(metrics[LOSS_METRIC])
    assert sum(m["taid/t"] for m in parts) == pytest.approx(0.6)
    loss.backward()
    assert student.grad[~batch.response_mask].eq(0).all() and student.grad.abs().sum() > 0


def test_topk_buckets_and_all_masked_rows():
    student, _, batch = make_batch(seed=5, topk=3)
    view = SimpleNamespace(logits=student)
    buckets = topk_buckets(log_probs(student), batch.teacher_topk_ids, batch.teacher_topk_logprobs)
    forward = kl_from_logprobs(buckets[1], buckets[0])[batch.response_mask].mean()
    torch.testing.assert_close(TAIDStepLoss(t=1.0).loss(view, batch)[0], forward)
    assert TAIDStepLoss(t=0.0).loss(view, batch)[0].item() == 0
    batch = batch.replace(response_mask=torch.zeros_like(batch.response_mask))
    loss, metrics = TAIDStepLoss(t=0.5).loss(view, batch)
    assert loss.item() == 0 and metrics == {LOSS_METRIC: 0.0, "taid/t": 0.0}


def test_observe_drives_t_and_loss_for_carries_it():
    algorithm, losses = TAID(**HYPER), [2.0, 1.5, 1.2, 1.3, 0.9]
    assert algorithm.loss_for(0) == TAIDStepLoss(t=0.4)
    for loss in losses:
        algorithm.observe({LOSS_METRIC: loss, "learner/loss": loss})
    step_loss = algorithm.loss_for(5)
    assert step_loss.t == pytest.approx(run(losses)[-1], rel=1e-12) and step_loss.t > 0.4
    student, _, batch = make_batch(seed=7)
    view = SimpleNamespace(logits=student)
    assert algorithm.loss(view, batch)[1] == step_loss.loss(view, batch)[1]
    assert pickle.loads(pickle.dumps(step_loss)) == step_loss
    before = algorithm.state_dict()  # empty batches and non-finite losses measure nothing
    algorithm.observe({"learner/loss": 0.0, "learner/empty_batch": 1.0})
    algorithm.observe({LOSS_METRIC: math.nan})
    assert algorithm.state_dict() == before
    with pytest.raises(KeyError, match="taid/loss"):
        algorithm.observe({"learner/loss": 1.0, "learner/empty_batch": 0.0})


def test_state_round_trips_through_json_and_is_not_shared():
    algorithm, fresh = TAID(**{**HYPER, "alpha": 0.05}), TAID(**{**HYPER, "alpha": 0.05})
    for loss in [3.0, 2.0, 1.0]:
        algorithm.observe({LOSS_METRIC: loss})
    assert fresh.state_dict() == {"t": 0.4, "momentum": 0.0, "previous_loss": None, "steps": 0}
    fresh.load_state_dict(json.loads(json.dumps(algorithm.state_dict(), allow_nan=False)))
    assert fresh.state_dict() == algorithm.state_dict() and fresh.loss_for(3).t > 0.4
    for loss in [0.8, 0.9, 0.5]:
        algorithm.observe({LOSS_METRIC: loss})
        fresh.observe({LOSS_METRIC: loss})
        assert fresh.loss_for(0) == algorithm.loss_for(0)


def test_defaults_plan_and_validation():
    assert (TAID().t_start, TAID().alpha, TAID().beta, TAID().t_end) == (0.4, 5e-4, 0.99, 1.0)
    for kwargs in [{"t_start": -0.1}, {"t_end": 0.3}, {"alpha": 2.0}, {"beta": 1.0}]:
        with pytest.raises(FieldError) as error:
            TAID(**kwargs)
        assert error.value.field == next(iter(kwargs))
    assert TAID(source="dataset", teacher_output="full").plan(3).source == "dataset"
    assert TAID(topk=8).plan(0) == RolloutPlan(source="student", teacher_need="topk", topk=8)
