"""Evaluation metrics against brute-force definitions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from protege.algorithms.divergences import kl_from_logprobs
from protege.eval import metrics as m


@pytest.mark.parametrize(
    "n,c,k", [(n, c, k) for n in range(1, 7) for c in range(n + 1) for k in range(1, n + 1)]
)
def test_pass_at_k_equals_enumeration_of_k_subsets(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert m.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_large_n_is_stable_and_bad_input_refused():
    assert m.pass_at_k(1000, 1, 1) == pytest.approx(1e-3)
    assert m.pass_at_k(1000, 0, 500) == 0.0
    assert m.mean_pass_at_k([[True, False], [False, False]], 1) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="pass@k"):
        m.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="pass@k"):
        m.pass_at_k(3, 1, 4)


def test_distinct_n_hand_computed():
    responses = [["a", "b", "a"], ["a", "b"], []]
    assert m.distinct_n(responses, 1) == pytest.approx(2 / 5)  # a b a a b
    assert m.distinct_n(responses, 2) == pytest.approx(2 / 3)  # ab ba ab
    assert m.distinct_n(responses, 3) == pytest.approx(1.0)  # aba
    assert m.distinct_n([["x"]], 2) == 0.0


def test_bleu_hand_computed_case():
    hyp = ["the", "cat", "sat"]
    refs = [["the", "cat", "sat", "down"], ["a", "cat", "sat"]]
    # p1 = 3/3, p2 = 2/2, p3 = 1/1; closest reference length: 3 and 4 are at 0 and 1 -> 3, no penalty
    assert m.bleu(hyp, refs) == pytest.approx(1.0)
    # against the 4-token reference alone: precisions 1, brevity penalty exp(1 - 4/3)
    assert m.bleu(hyp, [refs[0]]) == pytest.approx(math.exp(1 - 4 / 3))
    # p1 = 2/3 (the, cat), p2 = 1/2 (the cat), p3 = 0 -> smoothed 0.1/1
    value = m.bleu(["the", "cat", "ran"], [["the", "cat", "sat"]])
    assert value == pytest.approx((2 / 3 * 1 / 2 * 0.1) ** (1 / 3))


def test_self_bleu_over_groups_hand_computed():
    groups = [[["1", "2"], ["1", "2"], ["1", "3"]], [["7"]]]
    # group 1: sample 0 vs {12, 13} -> 1; sample 1 -> 1; sample 2 vs {12, 12}: p1 = 1/2, p2 = 0.1/1
    expected = (1.0 + 1.0 + math.sqrt(0.5 * 0.1)) / 3  # the one-sample group is skipped
    assert m.self_bleu(groups) == pytest.approx(expected)
    assert math.isnan(m.self_bleu([[["1"]]]))


def test_ece_equals_manual_binning():
    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(200, generator=gen, dtype=torch.float64).tolist() + [0.0, 1.0, 0.5, 0.1]
    correct = [bool(x) for x in (torch.rand(204, generator=gen) < 0.6).tolist()]
    bins = 10
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(conf) if (lo < c <= hi) or (b == 0 and c == 0.0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            avg = sum(conf[i] for i in members) / len(members)
            total += len(members) / len(conf) * abs(acc - avg)
    assert m.expected_calibration_error(conf, correct, bins) == pytest.approx(total, abs=1e-12)


def test_ece_perfectly_calibrated_and_bad_input():
    assert m.expected_calibration_error([1.0, 1.0, 0.0], [True, True, False]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        m.expected_calibration_error([1.2], [True])
    with pytest.raises(ValueError):
        m.expected_calibration_error([], [])


def test_mean_token_entropy_equals_direct_computation():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    logits[0, 0, 2] = -math.inf  # a zero-probability token contributes 0, not NaN
    logp = torch.log_softmax(logits, -1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    values = []
    for b in range(3):
        for t in range(4):
            if mask[b, t]:
                p = logp[b, t].exp().tolist()
                values.append(-sum(x * math.log(x) for x in p if x > 0))
    assert m.mean_token_entropy(logp, mask) == pytest.approx(sum(values) / len(values), abs=1e-12)
    assert m.mean_token_entropy(logp, torch.zeros_like(mask)) == 0.0


def test_sampled_entropy_is_exact_in_expectation():
    logp = torch.log_softmax(torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=torch.float64), -1)
    expectation = sum(
        logp[v].exp().item()
        * m.sampled_token_entropy(logp[v].view(1, 1), torch.ones(1, 1, dtype=torch.bool))
        for v in range(4)
    )
    assert expectation == pytest.approx(
        m.mean_token_entropy(logp.view(1, 1, 4), torch.ones(1, 1, dtype=torch.bool))
    )


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_sampled_kl_expectation_equals_divergences_kl(direction):
    gen = torch.Generator().manual_seed(2)
    student = torch.log_softmax(torch.randn(5, generator=gen, dtype=torch.float64), -1)
    teacher = torch.log_softmax(torch.randn(5, generator=gen, dtype=torch.float64), -1)
    sampler, other = (student, teacher) if direction == "reverse" else (teacher, student)
    one = torch.ones(1, 1, dtype=torch.bool)
    expectation = sum(
        sampler[v].exp().item()
        * m.sampled_kl_per_token(sampler[v].view(1, 1), other[v].view(1, 1), one)
        for v in range(5)
    )
    assert expectation == pytest.approx(kl_from_logprobs(sampler, other).item(), abs=1e-12)


def test_sampled_kl_over_sequences_is_sequence_kl_per_token():
    """Two-token sequences: the per-sequence sum's expectation is the sequence-level KL."""
    gen = torch.Generator().manual_seed(3)
    q1, p1 = (
        torch.log_softmax(torch.randn(3, generator=gen, dtype=torch.float64), -1) for _ in range(2)
    )
    q2, p2 = (
        torch.log_softmax(torch.randn(3, 3, generator=gen, dtype=torch.float64), -1)
        for _ in range(2)
    )
    mask = torch.ones(1, 2, dtype=torch.bool)
    expectation, exact = 0.0, 0.0
    for a, b in itertools.product(range(3), repeat=2):
        prob = (q1[a] + q2[a, b]).exp().item()
        sample_q = torch.stack([q1[a], q2[a, b]]).view(1, 2)
        sample_p = torch.stack([p1[a], p2[a, b]]).view(1, 2)
        expectation += (
            prob * 2 * m.sampled_kl_per_token(sample_q, sample_p, mask)
        )  # x tokens = seq sum
        exact += prob * ((q1[a] + q2[a, b]) - (p1[a] + p2[a, b])).item()
    assert expectation == pytest.approx(exact, abs=1e-12)


def test_sequence_confidence_ignores_padding():
    logp = torch.tensor([[-0.1, -0.2, -5.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert m.sequence_confidence(logp, mask).tolist() == pytest.approx(
        [math.exp(-0.3), math.exp(-1.0)]
    )
