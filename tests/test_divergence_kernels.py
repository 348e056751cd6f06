"""The written-out KL and JSD gradients (protege.algorithms.divergence_kernels) against
autograd through the textbook formulas in float64, at impossible tokens, and position by
position (a block of positions gives the bits of the whole batch)."""

from __future__ import annotations

import math

import pytest
import torch

from protege.algorithms.divergence_kernels import JSDFromLogprobs, KLFromLogprobs
from protege.chunked import blocks

INF = math.inf


def logprobs(seed: int, impossible: list[int] = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 4, 11, generator=g, dtype=torch.float64) * 2
    logits[..., list(impossible)] = -INF
    return torch.log_softmax(logits, -1).requires_grad_(True)


def textbook_kl(p_logp, q_logp):
    """Σ_v p_v (log p_v − log q_v) over the entries with p_v > 0, traced by autograd."""
    keep = p_logp > -INF
    p_part = torch.where(keep, p_logp, 0.0)
    q_part = torch.where(keep, q_logp, 0.0)
    return (torch.where(keep, p_part.exp(), 0.0) * (p_part - q_part)).sum(-1)


def textbook_jsd(student_logp, teacher_logp, beta):
    """β KL(p‖M) + (1−β) KL(q‖M), M = βp + (1−β)q in probability space, traced by autograd."""
    p, q = teacher_logp.exp(), student_logp.exp()
    mixture = beta * p + (1 - beta) * q
    safe = torch.where(mixture > 0, mixture, 1.0).log()
    return beta * textbook_kl(teacher_logp, safe) + (1 - beta) * textbook_kl(student_logp, safe)


def value_and_grads(fn, first, second):
    value = fn(first, second)
    weights = torch.linspace(0.5, 1.5, value.numel(), dtype=value.dtype).view_as(value)
    grads = torch.autograd.grad((value * weights).sum(), (first, second))
    return value, grads


@pytest.mark.parametrize("impossible", [([], []), ([2], []), ([5], [5]), ([2, 7], [7])])
def test_kl_gradients_equal_autograd_of_the_definition(impossible):
    p_logp, q_logp = logprobs(1, impossible[0]), logprobs(2, impossible[1])  # q > 0 where p > 0
    ours = value_and_grads(KLFromLogprobs.apply, p_logp, q_logp)
    reference = value_and_grads(textbook_kl, p_logp, q_logp)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-12, atol=1e-12)
    for got, want in zip(ours[1], reference[1]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert torch.isfinite(got).all()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("impossible", [([], []), ([3], []), ([], [3]), ([4, 8], [8])])
def test_jsd_gradients_equal_autograd_of_the_definition(beta, impossible):
    student, teacher = logprobs(3, impossible[0]), logprobs(4, impossible[1])
    ours = value_and_grads(lambda s, t: JSDFromLogprobs.apply(s, t, beta), student, teacher)
    reference = value_and_grads(lambda s, t: textbook_jsd(s, t, beta), student, teacher)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-10, atol=1e-12)
    for got, want in zip(ours[1], reference[1]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert torch.isfinite(got).all()


def test_jsd_stays_finite_where_both_probabilities_underflow():
    """Log-probs far below float32's smallest exp: the mixture is taken in log space, so
    those entries add 0 to the value and the gradient instead of 0·inf = NaN."""
    student = torch.tensor([[0.0, -120.0, -300.0]]).log_softmax(-1).requires_grad_(True)
    teacher = torch.tensor([[0.0, -150.0, -110.0]]).log_softmax(-1)
    value = JSDFromLogprobs.apply(student, teacher, 0.5)
    (grad,) = torch.autograd.grad(value.sum(), student)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    assert value.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kernel", ["kl", "jsd"])
def test_a_block_of_positions_gives_the_bits_of_the_whole(kernel):
    """Chunked losses rely on it: values and gradients over each block `protege.chunked`
    cuts (3 tokens of one row, views) equal the same entries computed over the whole
    [3,7,37] batch (37: not a vector-width multiple)."""
    g = torch.Generator().manual_seed(5)
    student = torch.randn(3, 7, 37, generator=g).log_softmax(-1).requires_grad_(True)
    teacher = torch.randn(3, 7, 37, generator=g).log_softmax(-1)

    def run(s, t):
        value = KLFromLogprobs.apply(t, s) if kernel == "kl" else JSDFromLogprobs.apply(s, t, 0.3)
        return value, torch.autograd.grad(value.sum(), s)[0]

    whole_value, whole_grad = run(student, teacher)
    for cut in blocks(3, 7, 3):
        block = student[cut].detach().requires_grad_(True)
        block_value, block_grad = run(block, teacher[cut])
        assert torch.equal(block_value, whole_value[cut]), cut
        assert torch.equal(block_grad, whole_grad[cut]), cut
