"""The rollout queue: rollouts submitted ahead of training, prompts drawn ahead, and the
rule that decides how far ahead (trainer.max_staleness) — the pipelining state."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protege.data import PromptSource
from protege.records import PromptBatch


@dataclass(frozen=True)
class Submitted:
    """A step's rollout in flight: its prompts and one future (or batch) per shard."""

    prompts: PromptBatch
    shards: list[Any]


class RolloutQueue:
    """Step k's rollout is submitted by `submit(k, prompts)`; `submit_ahead(k)` keeps steps
    k+1 .. k+max_staleness in flight while step k trains. They sample with the weights the
    samplers hold at submission, which miss step k's update (and later ones) by the time
    they are trained on: at most `max_staleness` updates stale. Their behaviour and student
    log-probs are the sampling policy's, which the importance weights and PPO ratios of the
    policy-gradient losses divide by. A checkpoint step fills the queue even past the last
    step: a run resumed from it, and trained longer, must find the rollouts the
    uninterrupted run sampled."""

    def __init__(
        self,
        submit: Callable[[int, PromptBatch], list[Any]],
        prompts: PromptSource,
        steps: int,
        max_staleness: int,
        checkpoint_due: Callable[[int], bool],
    ):
        self._submit, self.prompts = submit, prompts
        self.steps, self.max_staleness, self.checkpoint_due = steps, max_staleness, checkpoint_due
        self.pending: dict[int, Submitted] = {}  # submitted ahead, by step
        self.drawn: dict[int, PromptBatch] = {}  # prompts drawn ahead (while the learner works)

    def take(self, k: int) -> Submitted:
        """Step k's rollout: the one submitted ahead, or submitted now."""
        return self.pending.pop(k, None) or self.submit(k)

    def submit(self, k: int) -> Submitted:
        prompts = self.drawn.pop(k, None) or self.prompts.next(k)
        return Submitted(prompts, self._submit(k, prompts))

    def submit_ahead(self, k: int) -> None:
        """Submit steps k+1 .. k+max_staleness not yet in flight; tokenise the prompts of the
        first step after them now, while the learner works."""
        due = self.checkpoint_due(k)
        last = k + self.max_staleness if due else min(k + self.max_staleness, self.steps - 1)
        for j in range(k + 1, last + 1):
            if j not in self.pending:
                self.pending[j] = self.submit(j)
        after = max(last, k) + 1
        if after < self.steps and not due and after not in self.drawn:
            self.drawn[after] = self.prompts.next(after)

    def submit_drawn(self) -> None:
        """Submit the steps whose prompts were drawn ahead: a checkpoint written off the
        schedule (on a signal) must hold them, the data position having moved past them."""
        for j in sorted(self.drawn):
            self.pending[j] = self.submit(j)

    def resolved(self, fetch: Callable[[list[Any]], list[Any]]) -> dict[int, Submitted]:
        """Every rollout in flight, with its shards fetched (part of a checkpoint)."""
        self.pending = {j: Submitted(s.prompts, fetch(s.shards)) for j, s in self.pending.items()}
        return dict(self.pending)

    def restore(self, pending: dict[int, Submitted]) -> None:
        self.pending = dict(pending)

    def clear(self) -> None:
        """Drop rollouts past the last step (filled for a checkpoint)."""
        self.pending.clear()
