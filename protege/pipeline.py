"""The pipeline's stages as calls on futures: generate, score (per teacher), reward, train.

Stage calls take and return per-shard futures (Ray ObjectRefs, or in-process Futures /
values) and never block: a shard goes from its sampler to each teacher and the rewarder
without a stop at the driver; a colocated teacher (`rollout.colocate_teacher`) scores it
inside the sampler's `generate` call, and its client passes the shard on untouched. `gather` is the one wait of a rollout, `wait_train` the one
wait of an update. Training and evaluation use the same calls. The seconds the driver
waits and the seconds workers report are added up per phase for the step's accounting.

A shard remembers how it was made (`Shard.redo`): when a rollout, teacher or reward worker
dies with it in flight, the pipeline waits for Ray to restart the worker, sends the
samplers the current weights again and replays the shard's stages, at most
`trainer.worker_restarts` times. A learner rank that dies is not retried (WorkerDied).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from protege.config import Config
from protege.launch import Launcher, LocalLauncher, WorkerDied, spawn_roles
from protege.memory import peak_metrics
from protege.records import PromptBatch, RolloutBatch, RolloutPlan
from protege.sharding import (
    LEARNER_SECONDS,
    dataset_batch,
    merge_shards,
    reduce_learner_metrics,
    split_prompts,
)
from protege.teachers import scoring_plan

# Worker-side seconds each rollout stage reports in the batch's extras, by phase name.
WORKER_SECONDS = {"rollout": "rollout/seconds", "teacher": "teacher/seconds"}
WORKER_SECONDS["reward"] = "reward/seconds"
T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """One shard in flight: its future (or batch) and how to submit it again, every stage
    replayed, after a worker that held it died."""

    ref: Any
    redo: Callable[[], Any]
    min_version: int = 0  # the weights its sampler was sent; older ones: it was restarted
    scored_by: tuple[str, ...] = ()  # teachers that scored it in its sampler (colocated)

    @classmethod
    def of(
        cls, submit: Callable[[], Any], min_version: int = 0, scored_by: tuple[str, ...] = ()
    ) -> Shard:
        return cls(submit(), submit, min_version, scored_by)

    def then(self, stage: Callable[[Any], Any]) -> Shard:
        """This shard passed on to one more stage (which takes and returns a future)."""
        redo = self.redo
        return Shard(stage(self.ref), lambda: stage(redo()), self.min_version, self.scored_by)


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
        self.sent_version = 0  # the weights last sent to the samplers (loaded or queued)
        self._loads: list[Any] = []  # samplers' weight loads not yet checked
        self.retries = config.trainer.worker_restarts
        self.warn: Callable[[str], None] = _warn

    # -- stages: futures in, futures out ---------------------------------------------------
    def generate(self, prompts: PromptBatch, plan: RolloutPlan, score: bool = True) -> list[Shard]:
        """One shard per sampler: sampled responses, or the dataset's own. A colocated
        teacher (rollout.colocate_teacher) scores each sampled shard in the same call, unless
        `score` is False."""
        parts = split_prompts(prompts, len(self.samplers))
        if plan.source == "dataset":
            refs = [self.launcher.put(dataset_batch(part, self.version)) for part in parts]
            return [Shard(ref, lambda ref=ref: ref) for ref in refs]
        extra, scored_by = self._colocated_scoring(plan) if score else ((), ())
        return [
            Shard.of(
                functools.partial(s.generate.remote, part, plan, *extra),
                self.sent_version,
                scored_by,
            )
            for s, part in zip(self.samplers, parts)
        ]

    def _colocated_scoring(self, plan: RolloutPlan) -> tuple[tuple, tuple[str, ...]]:
        """(the extra `generate` argument: the colocated teacher's plan, the teachers it
        scores for), or nothing when no teacher is colocated or the plan needs none."""
        client = next((t for t in self.teachers if t.placement == "colocated"), None)
        if client is None or plan.teacher_need == "none":
            return (), ()
        return (client.own_plan(scoring_plan(plan, self.teachers, client)),), (client.name,)

    def reward(self, shards: list[Shard]) -> list[Shard]:
        if not self.rewarders:
            return shards
        scorers = [self.rewarders[i % len(self.rewarders)] for i in range(len(shards))]
        return [shard.then(scorer.score.remote) for scorer, shard in zip(scorers, shards)]

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
        resolved = self.resolve(shards)
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
        driver = peak_metrics("driver")  # the controller's own process (no model)
        return {**metrics, **driver, "rollout/staleness": float(pending.staleness)}

    def resolve(self, shards: list[Any]) -> list[RolloutBatch]:
        """A rollout's shards fetched (also to keep them in a checkpoint); a shard whose
        worker died is submitted again once the worker is back."""
        return [self._fetch(shard) for shard in shards]

    def _fetch(self, shard: Shard | RolloutBatch) -> RolloutBatch:
        if isinstance(shard, RolloutBatch):  # fetched before (restored from a checkpoint)
            return shard
        refs = [shard.ref]

        def attempt() -> RolloutBatch:
            if not refs:
                refs.append(shard.redo())
            batch = self.launcher.get(refs.pop())
            self._check_version(batch.weights_version, shard.min_version)
            return batch

        return self._retrying(attempt, "its shard")

    def _check_version(self, held: int, sent: int) -> None:
        """A sampler holding older weights than it was sent was restarted in between (Ray
        restarts it from the initial student; the calls queued before were dropped)."""
        if held < sent:
            raise WorkerDied(
                "rollout", -1, f"restarted: it sampled with weights v{held}, not the v{sent} sent"
            )

    def _retrying(self, attempt: Callable[[], T], what: str) -> T:
        """`attempt()`, tried again after a restartable worker died in it: the workers are
        back and the samplers hold the current weights before each retry."""
        for tries in range(self.retries + 1):
            try:
                return attempt()
            except WorkerDied as died:
                if not died.restartable or tries == self.retries:
                    if died.restartable:
                        died.args = (f"{died} (retried {tries} times: trainer.worker_restarts)",)
                    raise
                self.warn(f"{died}; retrying {what} ({tries + 1}/{self.retries})")
                self._recover()
        raise AssertionError("unreachable")

    def _recover(self) -> None:
        """Wait for restarted workers, then load the learner's current weights into every
        sampler (a restarted one starts from the initial student; the others load the weights
        they hold). No training call is in flight when a shard or a load is waited for."""
        self.launcher.wait_ready(self._restartable_handles())
        if self.nccl_sync:
            raise WorkerDied(
                "rollout",
                -1,
                "a restarted vLLM engine cannot rejoin the NCCL weight "
                "broadcast; use rollout.weight_sync=object_store to survive sampler restarts",
            )
        exported = self._export_weights()
        loads = [s.load_weights.remote(exported[0]) for s in self.samplers]
        self._loads = []  # superseded (and failed, on the restarted sampler)
        self.launcher.get([*loads, *exported[1:]])

    def _restartable_handles(self) -> list[Any]:
        teachers = [h for t in self.teachers if t.placement == "actors" for h in t.handles]
        return [*self.samplers, *teachers, *self.rewarders]

    # -- blocking compositions of the stages (evaluation) -------------------------------
    def sample(self, prompts: PromptBatch, plan: RolloutPlan) -> RolloutBatch:
        """Sampled only: evaluation scores what it needs with `score`."""
        return self.gather(self.generate(prompts, plan, score=False), prompts)

    def score(self, batch: RolloutBatch, plan: RolloutPlan) -> RolloutBatch:
        """`batch` scored by the first teacher (evaluation's KL to the teacher)."""
        refs = [self.launcher.put(s) for s in batch.shards(len(self.samplers))]
        scored = self.teachers[0].score([Shard(ref, lambda ref=ref: ref) for ref in refs], plan)
        return self.gather(scored, _no_text(batch))

    def greedy_texts(self, prompts: PromptBatch, max_new_tokens: int) -> list[str]:
        parts = split_prompts(prompts, len(self.samplers))

        def attempt() -> list[list[str]]:
            calls = zip(self.samplers, parts)
            texts = [s.greedy_texts.remote(p, max_new_tokens) for s, p in calls]
            versions = [s.weights_version.remote() for s in self.samplers]  # run after the texts
            for held in self.launcher.get(versions):
                self._check_version(held, self.sent_version)
            return self.launcher.get(texts)

        return [text for texts in self._retrying(attempt, "greedy decoding") for text in texts]

    # -- weights ---------------------------------------------------------------------------
    def sync_weights(self, wait: bool = True) -> int:
        """Push the learner's weights to every sampler; returns the new version. Through the
        object store (Ray) without a stop at the driver; with `wait=False` the samplers' loads
        queue behind their current work and are checked at the next sync."""
        started = time.perf_counter()
        self.wait_sync()
        self.sent_version = self.version  # the learner's, as of the last collected step
        if self.nccl_sync:  # every rank gathers (ZeRO-3), rank 0 broadcasts to the engines
            self.version = self._on_all_learners(lambda rank: rank.broadcast_weights.remote())
        else:
            exported = self._export_weights()
            self._loads = [s.load_weights.remote(exported[0]) for s in self.samplers]
            if wait:  # queued right behind the export: the version it exported
                version = self.learners[0].weights_version.remote()
                self.version = self.sent_version = self.launcher.get(version)
                self.wait_sync()
            self.launcher.get(exported[1:])
        self._add("time/sync", time.perf_counter() - started)
        return self.version

    def _export_weights(self) -> list[Any]:
        """Every learner rank's export (ZeRO-3 gathers are collective; rank 0's is sent). A
        serializing launcher copies the live weights into its object store as the call
        returns, so the learner hands them out uncopied there; in-process it snapshots them."""
        snapshot = not self.launcher.serializes
        return [rank.export_weights.remote(snapshot=snapshot) for rank in self.learners]

    def wait_sync(self) -> None:
        """Wait for (and surface errors of) the samplers' last weight loads; a sampler that
        died meanwhile gets the weights again once restarted."""

        def attempt() -> None:
            loads, self._loads = self._loads, []
            self.launcher.get(loads)

        self._retrying(attempt, "the weight load")

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


def _warn(message: str) -> None:
    print(f"[protege] {message}", file=sys.stderr, flush=True)


def _no_text(batch: RolloutBatch) -> PromptBatch:
    """A stand-in PromptBatch for `merge_shards` that attaches no pre-training text."""
    return PromptBatch(prompt_ids=batch.prompt_ids[:0], prompt_mask=batch.prompt_mask[:0])
