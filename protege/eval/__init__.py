"""Evaluation: task and distribution metrics, A/B comparison with confidence intervals."""
