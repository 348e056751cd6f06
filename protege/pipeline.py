"""The pipeline's stages as calls on futures: generate, score (per teacher), reward, train.

Stage calls take and return per-shard futures (Ray ObjectRefs, or in-process Futures /
values) and never block: a shard goes from its sampler to each teacher and the rewarder
without a stop at the driver. `gather` is the one wait of a rollout, `wait_train` the one
wait of an update. Training and evaluation use the same calls. The seconds the driver
waits and the seconds workers report are added up per phase for the step's accounting.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from protege.config import Config
from protege.launch import Launcher, LocalLauncher, spawn_roles
from protege.records import PromptBatch, RolloutBatch, RolloutPlan
from protege.sharding import (
    LEARNER_SECONDS,
    dataset_batch,
    merge_shards,
    reduce_learner_metrics,
    split_prompts,
)

# Worker-side seconds each rollout stage reports in the batch's extras, by phase name.
WORKER_SECONDS = {"rollout": "rollout/seconds", "teacher": "teacher/seconds"}
WORKER_SECONDS["reward"] = "reward/seconds"


@dataclass
class PendingTrain:
    refs: list[Any]  # one per data-parallel rank
    staleness: int  # learner updates since the weights that sampled the batch


class Pipeline:
    """Every role's workers behind the stage calls the controller makes."""

    def __init__(self, config: Config, launcher: Launcher, master_port: int = 29500):
        self.config, self.launcher = config, launcher
        if isinstance(launcher, LocalLauncher) and config.trainer.max_staleness > 0:
            launcher.threads = True  # in-process pipelining: each worker on its own thread
        roles = spawn_roles(config, launcher, master_port)
        self.learners, self.samplers = roles.learners, roles.samplers
        self.teachers, self.rewarders = roles.teachers, roles.rewarders
        self.nccl_sync = roles.nccl_sync
        self.seconds: dict[str, float] = {}
        self.version = 0  # the learner's version, as of the last collected step or sync
        self._loads: list[Any] = []  # samplers' weight loads not yet checked

    # -- stages: futures in, futures out ---------------------------------------------------
    def generate(self, prompts: PromptBatch, plan: RolloutPlan) -> list[Any]:
        """One shard per sampler: sampled responses, or the dataset's own."""
        parts = split_prompts(prompts, len(self.samplers))
        if plan.source == "dataset":
            return [self.launcher.put(dataset_batch(part, self.version)) for part in parts]
        return [s.generate.remote(part, plan) for s, part in zip(self.samplers, parts)]

    def reward(self, shards: list[Any]) -> list[Any]:
        if not self.rewarders:
            return shards
        return [
            self.rewarders[i % len(self.rewarders)].score.remote(s) for i, s in enumerate(shards)
        ]

    def train(self, batch: RolloutBatch, loss: Any) -> PendingTrain:
        """Start one optimizer step on `batch` (row shards over the data-parallel ranks) with
        the algorithm's per-step `loss` object."""
        staleness = self.version - batch.weights_version  # updates the sampling weights missed
        shards = batch.shards(len(self.learners), keep_empty=True)  # every rank steps
        refs = [rank.train.remote(shard, loss) for rank, shard in zip(self.learners, shards)]
        return PendingTrain(refs, staleness)

    # -- waits -----------------------------------------------------------------------------
    def gather(self, shards: list[Any], prompts: PromptBatch) -> RolloutBatch:
        """Wait for a rollout's shards; their worker-side seconds go to `time/rollout`,
        `time/teacher`, `time/reward` (the slowest shard: shards run in parallel)."""
        started = time.perf_counter()
        resolved = self.launcher.get(list(shards))
        self._add("time/wait_rollout", time.perf_counter() - started)
        for name, key in WORKER_SECONDS.items():
            self._add(f"time/{name}", max(shard.extras.get(key, 0.0) for shard in resolved))
        return merge_shards(resolved, prompts)

    def wait_train(self, pending: PendingTrain) -> dict[str, float]:
        started = time.perf_counter()
        metrics = reduce_learner_metrics(self.launcher.get(pending.refs))
        self._add("time/wait_learner", time.perf_counter() - started)
        self._add("time/learner", metrics.get(LEARNER_SECONDS, 0.0))
        self.version = int(metrics["learner/version"])
        return {**metrics, "rollout/staleness": float(pending.staleness)}

    def resolve(self, shards: list[Any]) -> list[RolloutBatch]:
        """A rollout's shards fetched (to keep them in a checkpoint)."""
        return self.launcher.get(list(shards))

    # -- blocking compositions of the stages (evaluation) -------------------------------
    def sample(self, prompts: PromptBatch, plan: RolloutPlan) -> RolloutBatch:
        return self.gather(self.generate(prompts, plan), prompts)

    def score(self, batch: RolloutBatch, plan: RolloutPlan) -> RolloutBatch:
        """`batch` scored by the first teacher (evaluation's KL to the teacher)."""
        shards = [self.launcher.put(s) for s in batch.shards(len(self.samplers))]
        scored = self.teachers[0].score(shards, plan)
        return self.gather(scored, _no_text(batch))

    def greedy_texts(self, prompts: PromptBatch, max_new_tokens: int) -> list[str]:
        parts = split_prompts(prompts, len(self.samplers))
        refs = [s.greedy_texts.remote(p, max_new_tokens) for s, p in zip(self.samplers, parts)]
        return [text for texts in self.launcher.get(refs) for text in texts]

    # -- weights ---------------------------------------------------------------------------
    def sync_weights(self, wait: bool = True) -> int:
        """Push the learner's weights to every sampler; returns the new version. Through the
        object store (Ray) without a stop at the driver; with `wait=False` the samplers' loads
        queue behind their current work and are checked at the next sync."""
        started = time.perf_counter()
        self.wait_sync()
        if self.nccl_sync:  # every rank gathers (ZeRO-3), rank 0 broadcasts to the engines
            self.version = self._on_all_learners(lambda rank: rank.broadcast_weights.remote())
        else:
            exported = [rank.export_weights.remote() for rank in self.learners]  # ZeRO-3: all
            self._loads = [s.load_weights.remote(exported[0]) for s in self.samplers]
            if wait:
                self.version = self.launcher.get(exported[0]).version
                self.wait_sync()
            self.launcher.get(exported[1:])
        self._add("time/sync", time.perf_counter() - started)
        return self.version

    def wait_sync(self) -> None:
        """Wait for (and surface errors of) the samplers' last weight loads."""
        loads, self._loads = self._loads, []
        self.launcher.get(loads)

    # -- persistence -----------------------------------------------------------------------
    def save_checkpoint(self, path: str) -> None:
        self.launcher.get([rank.save_checkpoint.remote(path) for rank in self.learners])

    def load_checkpoint(self, path: str) -> None:
        self.launcher.get([rank.load_checkpoint.remote(path) for rank in self.learners])

    def save_final(self, path: str) -> None:
        self._on_all_learners(lambda rank: rank.save_final.remote(path))

    def _on_all_learners(self, call: Callable[[Any], Any]) -> Any:
        """Collective learner calls (ZeRO-3 gathers shards) run on every rank; rank 0 answers."""
        return self.launcher.get([call(rank) for rank in self.learners])[0]

    # -- accounting ------------------------------------------------------------------------
    def _add(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    def take_seconds(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, {}
        return seconds

    @contextlib.contextmanager
    def timed_apart(self) -> Iterator[dict[str, float]]:
        """Time calls made inside (evaluation) apart from the training step's phases."""
        saved, self.seconds = self.seconds, {}
        try:
            yield self.seconds
        finally:
            self.seconds = saved


def _no_text(batch: RolloutBatch) -> PromptBatch:
    """A stand-in PromptBatch for `merge_shards` that attaches no pre-training text."""
    return PromptBatch(prompt_ids=batch.prompt_ids[:0], prompt_mask=batch.prompt_mask[:0])
