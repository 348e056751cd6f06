"""What one optimizer step did: the training engine's answer, read by the learner without
importing the engine (DeepSpeed loads only where a learner is built)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepResult:
    applied: bool  # False when the gradient norm was not finite (weights untouched)
    grad_norm: float  # global norm before clipping (inf when the step was skipped)
    lr: float  # learning rate this step used
