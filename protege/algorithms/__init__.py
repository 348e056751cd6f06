"""Distillation algorithms: pure tensor functions and registered strategies.

Importing this package registers every built-in algorithm in `ALGORITHMS`.
"""

from protege.algorithms import gated_dual_kl, gkd, minillm, opd, rl_distill  # noqa: F401
from protege.algorithms.registry import ALGORITHMS, Algorithm, build_algorithm, register

__all__ = ["ALGORITHMS", "Algorithm", "build_algorithm", "register"]
