"""DistiLLM's skew divergences (Ko et al. 2024, §3.1) and the `distillm` algorithm."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from protege.algorithms.distillm import DistiLLM
from protege.algorithms.divergences import (
    kl_from_logprobs,
    log_probs,
    skew_forward_kl,
    skew_reverse_kl,
)
from protege.algorithms.registry import FieldError
from protege.records import RolloutBatch

SKEWS = [skew_forward_kl, skew_reverse_kl]


def pair(seed: int = 0, shape=(2, 3, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, generator=generator, dtype=torch.float64)
    teacher = 2.0 * torch.randn(*shape, generator=generator, dtype=torch.float64)
    return log_probs(student), log_probs(teacher)


def brute_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def brute_skew(student_logp, teacher_logp, alpha: float, reverse: bool) -> torch.Tensor:
    """Explicit loops over positions and vocabulary, in float64 probabilities."""
    out = torch.zeros(student_logp.shape[:-1], dtype=torch.float64)
    for index in itertools.product(*map(range, student_logp.shape[:-1])):
        q = student_logp[index].exp().tolist()
        p = teacher_logp[index].exp().tolist()
        if reverse:  # KL(q ‖ (1−α)p + αq)
            mixture = [(1 - alpha) * pi + alpha * qi for pi, qi in zip(p, q)]
            out[index] = brute_kl(q, mixture)
        else:  # KL(p ‖ αp + (1−α)q)
            mixture = [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q)]
            out[index] = brute_kl(p, mixture)
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("reverse", [False, True])
def test_skew_divergences_match_brute_force(alpha, reverse):
    student, teacher = pair(seed=1)
    skew = skew_reverse_kl if reverse else skew_forward_kl
    expected = brute_skew(student, teacher, alpha, reverse)
    torch.testing.assert_close(skew(student, teacher, alpha), expected, rtol=1e-10, atol=1e-12)


def test_forward_and_reverse_skews_differ():
    student, teacher = pair(seed=2)
    forward, reverse = (
        skew_forward_kl(student, teacher, 0.1),
        skew_reverse_kl(student, teacher, 0.1),
    )
    assert (forward - reverse).abs().max() > 1e-3


def test_alpha_zero_is_plain_kl_and_alpha_one_is_zero():
    student, teacher = pair(seed=3)
    torch.testing.assert_close(
        skew_forward_kl(student, teacher, 0.0), kl_from_logprobs(teacher, student)
    )
    torch.testing.assert_close(
        skew_reverse_kl(student, teacher, 0.0), kl_from_logprobs(student, teacher)
    )
    for skew in SKEWS:
        assert skew(student, teacher, 1.0).abs().max() == 0
        assert skew(student, teacher, 1 - 1e-9).abs().max() < 1e-7
        values = [skew(student, teacher, a).sum().item() for a in (0.0, 0.1, 0.5, 0.9)]
        assert values == sorted(values, reverse=True)  # more skew, smaller divergence


@pytest.mark.parametrize("skew", SKEWS)
def test_skews_are_finite_with_disjoint_support(skew):
    """A −inf teacher entry (zero mass) where the student has mass, and vice versa: plain
    reverse KL is infinite there, the skewed one is bounded by −log α."""
    student_logits = torch.tensor([[0.0, 1.0, -math.inf, 0.5]], dtype=torch.float64)
    teacher_logits = torch.tensor([[-math.inf, 2.0, 0.0, 0.5]], dtype=torch.float64)
    student, teacher = log_probs(student_logits), log_probs(teacher_logits)
    student.requires_grad_(True)
    value = skew(student, teacher, 0.1)
    expected = brute_skew(student.detach(), teacher, 0.1, skew is skew_reverse_kl)
    torch.testing.assert_close(value.detach(), expected)
    assert value.isfinite().all() and value.item() <= -math.log(0.1)
    value.sum().backward()
    assert student.grad.isfinite().all()
    assert math.isinf(kl_from_logprobs(student.detach(), teacher).item())  # what α = 0 gives


@pytest.mark.parametrize("skew", SKEWS)
def test_gradcheck(skew):
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = log_probs(torch.randn(2, 3, 5, dtype=torch.float64, generator=generator))
    assert torch.autograd.gradcheck(lambda x: skew(log_probs(x), teacher, 0.1), (logits,))


# ---------------------------------------------------------------- the algorithm


def batch_and_logits(seed: int = 0, teacher_need: str = "full", topk: int = 4):
    generator = torch.Generator().manual_seed(seed)
    rows, tokens, vocab = 3, 4, 9
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    student = torch.randn(rows, tokens, vocab, generator=generator, dtype=torch.float64)
    teacher = 2.0 * torch.randn(rows, tokens, vocab, generator=generator, dtype=torch.float64)
    fields: dict = {"teacher_logits": teacher}
    if teacher_need == "topk":
        values, ids = log_probs(teacher).topk(topk, dim=-1)
        fields = {"teacher_topk_ids": ids, "teacher_topk_logprobs": values}
    batch = RolloutBatch(
        prompt_ids=torch.ones(rows, 2, dtype=torch.long),
        prompt_mask=torch.ones(rows, 2, dtype=torch.bool),
        response_ids=torch.randint(0, vocab, (rows, tokens), generator=generator),
        response_mask=mask,
        **fields,
    )
    return student.requires_grad_(True), teacher, batch


@pytest.mark.parametrize("divergence", ["skew_forward", "skew_reverse"])
def test_loss_is_the_token_mean_of_the_skew(divergence):
    logits, teacher, batch = batch_and_logits(seed=5)
    algorithm = DistiLLM(divergence=divergence, alpha=0.2, teacher_output="full")
    loss, metrics = algorithm.loss(SimpleNamespace(logits=logits), batch)
    per_token = brute_skew(
        log_probs(logits.detach()), log_probs(teacher), 0.2, divergence == "skew_reverse"
    )
    expected = per_token[batch.response_mask].mean()
    torch.testing.assert_close(loss.detach(), expected)
    assert metrics == {f"distillm/{divergence}": pytest.approx(expected.item())}
    loss.backward()
    assert logits.grad[~batch.response_mask].eq(0).all()
    assert logits.grad[batch.response_mask].abs().sum() > 0


def test_loss_on_topk_and_with_a_global_normaliser():
    logits, _, batch = batch_and_logits(seed=6, teacher_need="topk")
    algorithm = DistiLLM(alpha=0.1, topk=4)
    loss, _ = algorithm.loss(SimpleNamespace(logits=logits), batch)
    assert loss.isfinite() and loss > 0
    halves = [batch.select([0, 1]), batch.select([2])]
    total = batch.num_response_tokens
    parts = [
        algorithm.loss(SimpleNamespace(logits=logits[rows]), part.replace(token_count=total))[0]
        for rows, part in zip([slice(0, 2), slice(2, 3)], halves)
    ]
    torch.testing.assert_close(sum(parts), loss)


def test_all_masked_rows_give_zero():
    logits, _, batch = batch_and_logits(seed=7)
    batch = batch.replace(response_mask=torch.zeros_like(batch.response_mask))
    loss, metrics = DistiLLM(teacher_output="full").loss(SimpleNamespace(logits=logits), batch)
    assert loss.item() == 0 and metrics["distillm/skew_reverse"] == 0


def test_plan_samples_on_policy_with_probability_lmbda():
    sources = [DistiLLM(lmbda=0.3, seed=1).plan(step).source for step in range(2000)]
    assert set(sources) == {"student", "dataset"}
    assert abs(sources.count("student") / len(sources) - 0.3) < 0.05
    assert {DistiLLM(lmbda=1.0).plan(s).source for s in range(50)} == {"student"}
    assert {DistiLLM(lmbda=0.0).plan(s).source for s in range(50)} == {"dataset"}
    plan = DistiLLM(teacher_output="topk", topk=8, temperature=0.5).plan(0)
    assert (plan.teacher_need, plan.topk, plan.temperature) == ("topk", 8, 0.5)


def test_defaults_and_validation():
    algorithm = DistiLLM()
    assert (algorithm.divergence, algorithm.alpha) == ("skew_reverse", 0.1)
    assert algorithm.loss_for(3) is algorithm
    for bad in [{"alpha": 1.0}, {"alpha": -0.1}, {"lmbda": 1.5}, {"temperature": 0.0}]:
        with pytest.raises(FieldError) as error:
            DistiLLM(**bad)
        assert error.value.field == next(iter(bad))
    with pytest.raises(FieldError):
        DistiLLM(divergence="jsd")
