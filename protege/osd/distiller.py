"""The draft's learner: distils the draft toward the target on drained buffer records.

A thin wrapper of the training pipeline's `Learner` (DeepSpeed engine, registered `gkd`
loss: forward KL, reverse KL or JSD(β) from `protege.algorithms.divergences`, over the full
vocabulary or the target's top-k + tail). It holds its own copy of the draft, so serving
goes on with the old weights while it trains; `update` returns the new ones.
"""

from __future__ import annotations

import time

from protege.actors.learner import Learner
from protege.osd.config import OSDConfig
from protege.osd.records import DistillRecords, DistillResult


class DraftDistiller:
    """One update = `distill.steps_per_update` optimizer steps on one drained buffer."""

    def __init__(self, config: OSDConfig, master_port: int = 29500):
        self.config = config
        self.learner = Learner(config.learner_config(), master_port=master_port)

    @property
    def version(self) -> int:
        return self.learner.version

    def update(self, records: DistillRecords) -> DistillResult:
        started = time.perf_counter()
        batch = records.to_batch()
        losses = []
        metrics: dict[str, float] = {}
        for _ in range(self.config.distill.steps_per_update):
            metrics = self.learner.train(batch)
            losses.append(metrics["learner/loss"])
        metrics = {
            **metrics,
            "distill/loss_first": losses[0],
            "distill/loss_last": losses[-1],
            "distill/records": float(records.size),
            "distill/rejected_fraction": float(records.rejected.float().mean()),
            "distill/kl_at_serving": float(records.forward_kl().mean()),
            "distill/seconds": time.perf_counter() - started,
        }
        return DistillResult(self.learner.export_weights(), records.size, metrics)
