"""Return and advantage estimators against explicit Python loops on ragged masks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protege.algorithms.advantages import (
    broadcast_to_tokens,
    discounted_returns,
    future_returns,
    group_normalised,
    leave_one_out,
    whiten,
)


def ragged(batch: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float64 values and a right-padded mask with lengths in [1, tokens], including
    a one-token row and a full row."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, tokens, generator=generator, dtype=torch.float64)
    lengths = torch.randint(1, tokens + 1, (batch,), generator=generator)
    lengths[0], lengths[-1] = 1, tokens
    mask = torch.arange(tokens) < lengths.unsqueeze(-1)
    values[~mask] = 1e6  # padding junk must not leak into any real token
    return values, mask


def future_returns_loop(rewards, mask, gamma, length_normalise, include_current=False):
    out = torch.zeros_like(rewards)
    first = 0 if include_current else 1  # R_t, or R_{t+1}
    for b in range(rewards.shape[0]):
        positions = [t for t in range(rewards.shape[1]) if mask[b, t]]
        for t in positions:
            later = [i for i in positions if i >= t + first]
            total = sum(gamma ** (i - t - first) * rewards[b, i].item() for i in later)
            if length_normalise and later:
                total /= len(later)
            out[b, t] = total
    return out


def discounted_returns_loop(rewards, mask, gamma):
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        positions = [t for t in range(rewards.shape[1]) if mask[b, t]]
        for t in positions:
            out[b, t] = sum(gamma ** (i - t) * rewards[b, i].item() for i in positions if i >= t)
    return out


@pytest.mark.parametrize("length_normalise", [True, False])
@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5, 0.0])
@pytest.mark.parametrize("seed", range(3))
def test_future_returns_match_loops(gamma, length_normalise, seed):
    rewards, mask = ragged(6, 7, seed)
    actual = future_returns(rewards, mask, gamma, length_normalise)
    expected = future_returns_loop(rewards, mask, gamma, length_normalise)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    last = mask.sum(-1) - 1
    assert actual[torch.arange(6), last].eq(0).all()  # nothing remains after the last token
    assert actual[~mask].eq(0).all()
    with_current = future_returns(rewards, mask, gamma, length_normalise, include_current=True)
    expected = future_returns_loop(rewards, mask, gamma, length_normalise, include_current=True)
    torch.testing.assert_close(with_current, expected, rtol=1e-12, atol=1e-12)


def test_future_returns_length_normalisation_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    normalised = future_returns(rewards, mask, 1.0, True)
    assert normalised.tolist() == [[(2 + 3) / 2, 3 / 1, 0.0, 0.0]]
    discounted = future_returns(rewards, mask, 0.5, False)
    assert discounted.tolist() == [[2 + 0.5 * 3, 3.0, 0.0, 0.0]]


@pytest.mark.parametrize("gamma", [1.0, 0.8, 0.0])
def test_discounted_returns_match_loops(gamma):
    rewards, mask = ragged(5, 6, seed=7)
    actual = discounted_returns(rewards, mask, gamma)
    expected = discounted_returns_loop(rewards, mask, gamma)
    torch.testing.assert_close(actual[mask], expected[mask], rtol=1e-12, atol=1e-12)


def test_whiten_matches_loops():
    values, mask = ragged(5, 6, seed=8)
    real = [values[b, t].item() for b in range(5) for t in range(6) if mask[b, t]]
    mean = sum(real) / len(real)
    std = math.sqrt(sum((x - mean) ** 2 for x in real) / len(real))
    actual = whiten(values, mask)
    for b in range(5):
        for t in range(6):
            expected = (values[b, t].item() - mean) / std if mask[b, t] else 0.0
            assert actual[b, t].item() == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_whiten_of_constant_or_empty_is_zero_not_nan():
    mask = torch.tensor([[True, True, False]])
    assert whiten(torch.full((1, 3), 3.0), mask).eq(0).all()
    assert whiten(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool)).eq(0).all()


def groups_by_loop(group_ids):
    groups: dict[int, list[int]] = {}
    for row, gid in enumerate(group_ids.tolist()):
        groups.setdefault(gid, []).append(row)
    return groups


@pytest.mark.parametrize("seed", range(3))
def test_group_normalised_matches_loops(seed):
    generator = torch.Generator().manual_seed(seed)
    group_ids = torch.tensor([7, 3, 7, 3, 7, 9, 9, 3, 11])  # unsorted, uneven, and a singleton
    rewards = torch.randn(len(group_ids), generator=generator, dtype=torch.float64)
    actual = group_normalised(rewards, group_ids)
    for rows in groups_by_loop(group_ids).values():
        values = [rewards[r].item() for r in rows]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        for r in rows:
            assert actual[r].item() == pytest.approx(
                (rewards[r].item() - mean) / (std + 1e-6), rel=1e-9
            )


def test_group_normalised_equal_rewards_give_zero():
    """All samples of a prompt right (or wrong): no signal, exactly zero — also for rewards
    whose float32 mean is not exactly representable."""
    group_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    for value in (0.0, 1.0, 0.1, 1000.1):
        rewards = torch.full((6,), value, dtype=torch.float32)
        assert group_normalised(rewards, group_ids).abs().max().item() < 1e-3


@pytest.mark.parametrize("seed", range(3))
def test_leave_one_out_matches_loops(seed):
    generator = torch.Generator().manual_seed(seed)
    group_ids = torch.tensor([2, 5, 2, 5, 2, 8, 5, 5])  # group 8 is a singleton
    rewards = torch.randn(len(group_ids), generator=generator, dtype=torch.float64)
    actual = leave_one_out(rewards, group_ids)
    for rows in groups_by_loop(group_ids).values():
        for r in rows:
            others = [rewards[o].item() for o in rows if o != r]
            expected = rewards[r].item() - sum(others) / len(others) if others else 0.0
            assert actual[r].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@given(st.lists(st.floats(-5, 5), min_size=2, max_size=8), st.integers(1, 4))
@settings(max_examples=50, deadline=None)
def test_rloo_advantages_of_a_group_sum_to_zero(values, num_groups):
    rewards = torch.tensor(values, dtype=torch.float64)
    group_ids = torch.arange(len(values)) % num_groups
    advantages = leave_one_out(rewards, group_ids)
    for rows in groups_by_loop(group_ids).values():
        assert abs(sum(advantages[r].item() for r in rows)) < 1e-9


def test_broadcast_to_tokens():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    assert out.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]
