"""Distillation algorithms: pure tensor functions and registered strategies.

Importing this package registers every built-in algorithm in `ALGORITHMS`.
"""

from protege.algorithms import (  # noqa: F401
    distillm,
    gated_dual_kl,
    gkd,
    kv_distill,
    minillm,
    opd,
    rl_distill,
    taid,
)
from protege.algorithms.registry import ALGORITHMS, Algorithm, build_algorithm, register

__all__ = ["ALGORITHMS", "Algorithm", "build_algorithm", "register"]
