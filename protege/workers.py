"""The controller's typed view of every worker: generate, score, reward, train, sync.

`WorkerGroup` holds handles to the role workers and fans work out to them. Handles come
from a launcher: `LocalLauncher` builds the plain classes in this process (tests, small
jobs), `protege.actors.ray_actors.RayLauncher` builds them as Ray actors. Both hand back
objects whose methods are called as `handle.method.remote(...)` and resolved with
`launcher.get(...)`, so the same code drives both. A call's result (a Ray ObjectRef, or an
in-process Future) may be passed straight to another worker's call: it is resolved there.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from protege.actors.backends import sampler_class, teacher_class
from protege.actors.learner import Learner
from protege.actors.reward import RewardScorer
from protege.config import Config
from protege.records import PromptBatch, RolloutBatch, RolloutPlan, TokenSource, concat


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 0.0
    num_gpus: float = 0.0


class Launcher(Protocol):
    def spawn(
        self, role: str, cls: type, resources: list[Resources], args: list[tuple]
    ) -> list[Any]: ...

    def get(self, refs: Any) -> Any: ...

    def put(self, value: Any) -> Any: ...

    def rendezvous_host(self, role: str, resources: list[Resources]) -> str: ...


class _Call:
    def __init__(self, method: Callable):
        self.remote = method


class LocalHandle:
    """An in-process object with Ray's calling convention. `h.method.remote(...)` runs now, or,
    when the handle has its own thread, is queued there and returns a Future: calls then run
    one at a time in submission order, like a Ray actor's, while the caller goes on."""

    def __init__(self, target: Any, threaded: bool = False):
        self._target = target
        self._thread = (
            ThreadPoolExecutor(1, thread_name_prefix=type(target).__name__) if threaded else None
        )

    def __getattr__(self, name: str) -> _Call:
        method = getattr(self._target, name)
        if self._thread is None:
            return _Call(method)
        return _Call(functools.partial(self._thread.submit, _call_resolved, method))


def _call_resolved(method: Callable, *args, **kwargs) -> Any:
    """Run `method`, first waiting for arguments that are other calls' results (as Ray does)."""
    return method(*map(_resolve, args), **{key: _resolve(value) for key, value in kwargs.items()})


def _resolve(value: Any) -> Any:
    return value.result() if isinstance(value, Future) else value


class LocalLauncher:
    """Workers in this process. With `threads`, each runs on its own thread, so submitted
    rollouts overlap training (the pipelined loop); without, every call runs at once."""

    def __init__(self, threads: bool = False):
        self.threads = threads

    def spawn(
        self, role: str, cls: type, resources: list[Resources], args: list[tuple]
    ) -> list[Any]:
        return [LocalHandle(cls(*a), threaded=self.threads) for a in args]

    def get(self, refs: Any) -> Any:
        return [_resolve(ref) for ref in refs] if isinstance(refs, list) else _resolve(refs)

    def rendezvous_host(self, role: str, resources: list[Resources]) -> str:
        return "127.0.0.1"  # every worker is in this process

    def put(self, value: Any) -> Any:
        return value


def phase(name: str) -> Callable:
    """Record the wall seconds of a WorkerGroup method under `time/<name>`."""

    def decorate(method: Callable) -> Callable:
        def timed(self: WorkerGroup, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                self.seconds[f"time/{name}"] = self.seconds.get(f"time/{name}", 0.0) + (
                    time.perf_counter() - start
                )

        timed.__name__, timed.__doc__ = method.__name__, method.__doc__
        return timed

    return decorate


class WorkerGroup:
    """Every role's workers, behind one typed interface the controller calls."""

    def __init__(self, config: Config, launcher: Launcher, master_port: int = 29500):
        self.config, self.launcher = config, launcher
        if isinstance(launcher, LocalLauncher) and config.trainer.max_staleness > 0:
            launcher.threads = True  # in-process pipelining: each worker on its own thread
        self.seconds: dict[str, float] = {}
        self.self_teacher = config.teacher.model == "self"
        self.learners = self._spawn_learners(master_port)
        self.samplers = self._spawn_samplers()
        self.teachers = [] if self.self_teacher else self._spawn_teachers()
        self.rewarders = self._spawn_rewarders()
        self.version = 0  # the learner's version, as of the last collected step or sync
        self._loads: list[Any] = []  # samplers' weight loads not yet checked
        # LoRA self-distillation on vLLM: the rollout engine with no adapter is the teacher.
        self.teacher_on_samplers = self.self_teacher and config.teacher.backend == "vllm"
        self.nccl_sync = self._join_weight_broadcast()

    # -- construction -------------------------------------------------------------------
    def _spawn_learners(self, master_port: int) -> list[Any]:
        cfg, world = self.config, self.config.learner.num_workers
        resources = [Resources(cfg.learner.num_cpus, cfg.learner.num_gpus)] * world
        # Rank 0's node hosts the process group's rendezvous (the ranks may span nodes).
        host = self.launcher.rendezvous_host("learner", resources) if world > 1 else "127.0.0.1"
        args = [(cfg, rank, world, host, master_port) for rank in range(world)]
        return self.launcher.spawn("learner", Learner, resources, args)

    def _spawn_samplers(self) -> list[Any]:
        cfg, n = self.config, self.config.rollout.num_workers
        teacher = None if self.self_teacher else cfg.teacher.model
        lora = cfg.student.lora if cfg.student.lora.enabled else None
        res = Resources(cfg.rollout.num_cpus, cfg.rollout.num_gpus)
        args = [
            (
                cfg.student.model,
                cfg.rollout,
                teacher,
                cfg.student.dtype,
                cfg.trainer.seed + 1000 * i,
                lora,
            )
            for i in range(n)
        ]
        return self.launcher.spawn("rollout", sampler_class(cfg.rollout.backend), [res] * n, args)

    def _spawn_teachers(self) -> list[Any]:
        cfg, n = self.config.teacher, self.config.teacher.num_workers
        args = [(cfg.model, cfg.dtype, cfg.micro_batch_size)] * n
        resources = [Resources(cfg.num_cpus, cfg.num_gpus)] * n
        return self.launcher.spawn("teacher", teacher_class(cfg.backend), resources, args)

    def _spawn_rewarders(self) -> list[Any]:
        cfg = self.config.reward
        if not cfg.enabled:
            return []
        args = [(cfg, self.config.student.model)]
        return self.launcher.spawn(
            "reward", RewardScorer, [Resources(cfg.num_cpus, cfg.num_gpus)], args
        )

    def _join_weight_broadcast(self) -> bool:
        """`rollout.weight_sync=nccl`: learner rank 0 and the vLLM engines' GPU workers form
        one NCCL group, and every sync is a broadcast instead of an object-store copy."""
        rollout = self.config.rollout
        if rollout.weight_sync != "nccl":
            return False
        if rollout.backend != "vllm" or isinstance(self.launcher, LocalLauncher):
            raise ValueError(
                "rollout.weight_sync=nccl broadcasts to vLLM engines in Ray actors; it needs "
                "rollout.backend=vllm and trainer.workers=ray (else use object_store)"
            )
        receivers = self.launcher.get([s.weight_receivers.remote() for s in self.samplers])
        calls = [lr.init_weight_broadcast.remote(self.samplers, receivers) for lr in self.learners]
        self.launcher.get(calls)
        return True

    # -- the stages, blocking: one call per stage, each timed on the driver ----------------
    @phase("rollout")
    def generate(self, prompts: PromptBatch, plan: RolloutPlan) -> RolloutBatch:
        if plan.source == "dataset":
            return dataset_batch(prompts, self.version)
        shards = split_prompts(prompts, len(self.samplers))
        refs = [s.generate.remote(shard, plan) for s, shard in zip(self.samplers, shards)]
        batch = concat(_distinct_groups(self.launcher.get(refs)))
        return batch.replace(pretrain_ids=prompts.pretrain_ids, pretrain_mask=prompts.pretrain_mask)

    @phase("teacher")
    def score(self, batch: RolloutBatch, plan: RolloutPlan) -> RolloutBatch:
        if plan.teacher_need == "none":
            return batch
        if self.self_teacher and not self.teacher_on_samplers:
            return self._on_all_learners(
                lambda learner: learner.score_as_teacher.remote(batch, plan)
            )
        scorers = self.samplers if self.teacher_on_samplers else self.teachers
        shards = split_rows(batch, len(scorers))
        refs = [self._score_shard(i, shard, plan) for i, shard in enumerate(shards)]
        return _reassemble(batch, self.launcher.get(refs))

    @phase("reward")
    def reward(self, batch: RolloutBatch) -> RolloutBatch:
        if not self.rewarders:
            return batch
        return self.launcher.get(self.rewarders[0].score.remote(batch))

    def train(self, batch: RolloutBatch) -> dict[str, float]:
        return self.collect_train(self.submit_train(batch))

    @phase("sync")
    def sync_weights(self, wait: bool = True) -> int:
        """Push the learner's weights to every sampler; returns the new version.

        The update goes from the learner to the samplers through the object store (Ray) without
        a stop at the driver. With `wait=False` the samplers' loads are queued behind the work
        they already have (actors run calls in submission order) and checked at the next sync.
        """
        self.wait_sync()
        if self.nccl_sync:  # every rank gathers (ZeRO-3), rank 0 broadcasts to the engines
            self.version = self._on_all_learners(lambda learner: learner.broadcast_weights.remote())
            return self.version
        exported = [
            learner.export_weights.remote() for learner in self.learners
        ]  # ZeRO-3: all ranks
        self._loads = [s.load_weights.remote(exported[0]) for s in self.samplers]
        if wait:
            self.version = self.launcher.get(exported[0]).version
            self.wait_sync()
        self.launcher.get(exported[1:])
        return self.version

    def wait_sync(self) -> None:
        """Wait for (and surface errors of) the samplers' last weight loads."""
        loads, self._loads = self._loads, []
        self.launcher.get(loads)

    # -- the stages, submitted: rollouts and training run on the workers while the driver
    # -- goes on; `collect_*` waits. The controller pipelines rollouts with these.
    def submit_rollout(self, prompts: PromptBatch, plan: RolloutPlan) -> PendingRollout:
        """Start generate -> score -> reward for `prompts` on every sampler's shard; each shard
        goes from its sampler to a teacher (and a rewarder) without a stop at the driver."""
        if plan.source == "dataset":
            parts = split_prompts(prompts, max(len(self.teachers), 1))
            shards = [self.launcher.put(dataset_batch(part, self.version)) for part in parts]
        else:
            parts = split_prompts(prompts, len(self.samplers))
            shards = [s.generate.remote(part, plan) for s, part in zip(self.samplers, parts)]
        if plan.teacher_need != "none":
            shards = [self._score_shard(i, shard, plan) for i, shard in enumerate(shards)]
        if self.rewarders:
            shards = [self.rewarders[0].score.remote(shard) for shard in shards]
        return PendingRollout(prompts, shards)

    def _score_shard(self, index: int, shard: Any, plan: RolloutPlan) -> Any:
        if self.teacher_on_samplers:
            return self.samplers[index % len(self.samplers)].score_as_teacher.remote(shard, plan)
        if self.self_teacher:  # every rank joins (ZeRO-3 gathers); rank 0 answers
            refs = [lr.score_as_teacher.remote(shard, plan) for lr in self.learners]
            return refs[0]
        return self.teachers[index % len(self.teachers)].score.remote(shard, plan)

    def collect_rollout(self, pending: PendingRollout) -> RolloutBatch:
        """Wait for a submitted rollout; its worker-side seconds go to `time/rollout`,
        `time/teacher`, `time/reward` (the slowest shard: shards run in parallel)."""
        started = time.perf_counter()
        shards = pending.shards if pending.resolved else self.launcher.get(pending.shards)
        self._add("time/wait_rollout", time.perf_counter() - started)
        for name, key in WORKER_SECONDS.items():
            self._add(f"time/{name}", max(shard.extras.get(key, 0.0) for shard in shards))
        batch = concat(_distinct_groups(shards))
        prompts = pending.prompts
        return batch.replace(pretrain_ids=prompts.pretrain_ids, pretrain_mask=prompts.pretrain_mask)

    def submit_train(self, batch: RolloutBatch) -> PendingTrain:
        """Start one optimizer step on `batch` (row shards over the data-parallel ranks)."""
        staleness = self.version - batch.weights_version  # updates the sampling weights missed
        batch = batch.replace(token_count=batch.num_response_tokens)  # global normaliser
        shards = split_rows(batch, len(self.learners), keep_empty=True)  # every rank steps
        return PendingTrain([lr.train.remote(s) for lr, s in zip(self.learners, shards)], staleness)

    def collect_train(self, pending: PendingTrain) -> dict[str, float]:
        started = time.perf_counter()
        metrics = _sum_metrics(self.launcher.get(pending.refs))
        self._add("time/wait_learner", time.perf_counter() - started)
        self._add("time/learner", metrics.get(LEARNER_SECONDS, 0.0))
        self.version = int(metrics["learner/version"])
        return {**metrics, "rollout/staleness": float(pending.staleness)}

    def resolve(self, pending: PendingRollout) -> PendingRollout:
        """The same rollout with its shards fetched (to keep it in a checkpoint)."""
        if pending.resolved:
            return pending
        return PendingRollout(pending.prompts, self.launcher.get(pending.shards), resolved=True)

    def _add(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    # -- evaluation and persistence ------------------------------------------------------
    def greedy_texts(self, prompts: PromptBatch, max_new_tokens: int) -> list[str]:
        shards = split_prompts(prompts, len(self.samplers))
        refs = [
            s.greedy_texts.remote(shard, max_new_tokens) for s, shard in zip(self.samplers, shards)
        ]
        return [text for texts in self.launcher.get(refs) for text in texts]

    def save_checkpoint(self, path: str) -> None:
        self.launcher.get([lr.save_checkpoint.remote(path) for lr in self.learners])

    def load_checkpoint(self, path: str) -> None:
        self.launcher.get([lr.load_checkpoint.remote(path) for lr in self.learners])

    def save_final(self, path: str) -> None:
        self._on_all_learners(lambda learner: learner.save_final.remote(path))

    def _on_all_learners(self, call: Callable[[Any], Any]) -> Any:
        """Collective learner calls (ZeRO-3 gathers shards) run on every rank; rank 0 answers."""
        return self.launcher.get([call(learner) for learner in self.learners])[0]

    def take_seconds(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, {}
        return seconds

    @contextlib.contextmanager
    def timed_apart(self) -> Iterator[dict[str, float]]:
        """Time calls made inside (evaluation) apart from the training step's phases; yields
        the dict that receives their seconds."""
        saved, self.seconds = self.seconds, {}
        apart = self.seconds
        try:
            yield apart
        finally:
            self.seconds = saved


@dataclass(frozen=True)
class PendingRollout:
    """A submitted rollout: one result reference per shard, or the shards once resolved."""

    prompts: PromptBatch
    shards: list[Any]
    resolved: bool = False


@dataclass
class PendingTrain:
    refs: list[Any]  # one per data-parallel rank
    staleness: int  # learner updates since the weights that sampled the batch


# Worker-side seconds each stage reports in the batch's extras, by phase name.
WORKER_SECONDS = {
    "rollout": "rollout/seconds",
    "teacher": "teacher/seconds",
    "reward": "reward/seconds",
}
LEARNER_SECONDS = "learner/seconds"


def dataset_batch(prompts: PromptBatch, version: int) -> RolloutBatch:
    """The dataset's own responses as a batch (GKD's off-policy branch, SFT)."""
    if prompts.completion_ids is None:
        raise ValueError("this step trains on dataset responses, but the rows have no 'completion'")
    source = torch.full_like(prompts.completion_ids, int(TokenSource.DATASET), dtype=torch.int8)
    return RolloutBatch(
        prompt_ids=prompts.prompt_ids,
        prompt_mask=prompts.prompt_mask,
        response_ids=prompts.completion_ids,
        response_mask=prompts.completion_mask,
        token_source=source,
        answers=prompts.answers,
        pretrain_ids=prompts.pretrain_ids,
        pretrain_mask=prompts.pretrain_mask,
        step=prompts.step,
        weights_version=version,
    )


def _row_chunks(size: int, parts: int, keep_empty: bool = False) -> list[slice]:
    bounds = [round(i * size / parts) for i in range(parts + 1)]
    return [
        slice(bounds[i], bounds[i + 1])
        for i in range(parts)
        if keep_empty or bounds[i + 1] > bounds[i]
    ]


def split_prompts(prompts: PromptBatch, parts: int) -> list[PromptBatch]:
    """Contiguous row shards; pre-training text stays with the controller."""
    shards = []
    for rows in _row_chunks(prompts.size, parts):
        shards.append(
            PromptBatch(
                prompt_ids=prompts.prompt_ids[rows],
                prompt_mask=prompts.prompt_mask[rows],
                answers=prompts.answers[rows],
                completion_ids=None
                if prompts.completion_ids is None
                else prompts.completion_ids[rows],
                completion_mask=None
                if prompts.completion_mask is None
                else prompts.completion_mask[rows],
                step=prompts.step,
            )
        )
    return shards


def split_rows(batch: RolloutBatch, parts: int, keep_empty: bool = False) -> list[RolloutBatch]:
    return [batch.select(rows) for rows in _row_chunks(batch.size, parts, keep_empty)]


def _reassemble(original: RolloutBatch, shards: list[RolloutBatch]) -> RolloutBatch:
    merged = concat(shards)
    return merged.replace(
        pretrain_ids=original.pretrain_ids,
        pretrain_mask=original.pretrain_mask,
        token_count=original.token_count,
    )


def _distinct_groups(shards: list[RolloutBatch]) -> list[RolloutBatch]:
    """Offset each shard's group ids so samples of different prompts never share one."""
    offset, renumbered = 0, []
    for shard in shards:
        if shard.group_ids is None:
            renumbered.append(shard)
            continue
        renumbered.append(shard.replace(group_ids=shard.group_ids + offset))
        offset += int(shard.group_ids.max()) + 1
    return renumbered


# Learner metrics that every rank reports identically (the rest are shares of a global
# normaliser and add up across ranks).
SHARED_LEARNER_METRICS = frozenset(
    {
        "learner/lr",
        "learner/grad_norm",
        "learner/skipped",
        "learner/version",
        "learner/nonfinite",
        "learner/empty_batch",
    }
)


def _sum_metrics(results: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = dict(results[0])
    for metrics in results[1:]:
        for key, value in metrics.items():
            if key == LEARNER_SECONDS:  # ranks step in parallel: the slowest one counts
                total[key] = max(total.get(key, 0.0), value)
            elif key not in SHARED_LEARNER_METRICS:
                total[key] = total.get(key, 0.0) + value
    return total
