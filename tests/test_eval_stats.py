import itertools

import numpy as np
import pytest

from protege.eval.stats import bootstrap_ci, paired_test


def test_bootstrap_interval_brackets_mean_and_shrinks_with_more_data():
    rng = np.random.default_rng(1)
    small = bootstrap_ci(rng.normal(0.5, 0.1, size=5))
    large = bootstrap_ci(rng.normal(0.5, 0.1, size=500))
    assert small.low <= small.mean <= small.high
    assert (large.high - large.low) < (small.high - small.low)
    assert large.low < 0.5 < large.high


def test_bootstrap_single_value_is_a_point():
    ci = bootstrap_ci([0.7])
    assert (ci.mean, ci.low, ci.high) == (0.7, 0.7, 0.7)


def test_paired_p_value_equals_brute_force_sign_flips():
    a, b = [0.5, 0.6, 0.55, 0.7], [0.4, 0.62, 0.5, 0.6]
    d = np.subtract(a, b)
    flips = [abs(np.mean(np.multiply(s, d))) for s in itertools.product([-1, 1], repeat=4)]
    expected = np.mean([f >= abs(d.mean()) - 1e-12 for f in flips])
    assert paired_test(a, b).p_value == pytest.approx(expected)


def test_paired_test_detects_a_consistent_gain_and_not_noise():
    assert paired_test([0.9] * 6, [0.1] * 6).p_value == pytest.approx(2 / 64)
    assert paired_test([0.5, 0.6, 0.5, 0.6], [0.6, 0.5, 0.6, 0.5]).p_value == 1.0


@pytest.mark.parametrize("bad", [[], [float("nan")], [[1.0, 2.0]]])
def test_bad_input_is_named(bad):
    with pytest.raises(ValueError, match="values"):
        bootstrap_ci(bad)


def test_paired_lengths_must_match():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_test([1.0, 2.0], [1.0])
