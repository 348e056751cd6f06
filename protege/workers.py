"""The controller's typed view of every worker: generate, score, reward, train, sync.

`WorkerGroup` holds handles to the role workers and fans work out to them. Handles come
from a launcher: `LocalLauncher` builds the plain classes in this process (tests, small
jobs), `protege.actors.ray_actors.RayLauncher` builds them as Ray actors. Both hand back
objects whose methods are called as `handle.method.remote(...)` and resolved with
`launcher.get(...)`, so the same code drives both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
    def spawn(self, role: str, cls: type, resources: list[Resources], args: list[tuple]) -> list[Any]: ...

    def get(self, refs: Any) -> Any: ...

    def put(self, value: Any) -> Any: ...


class _Call:
    def __init__(self, method: Callable):
        self.remote = method


class LocalHandle:
    """An in-process object with Ray's calling convention: `h.method.remote(...)` runs now."""

    def __init__(self, target: Any):
        self._target = target

    def __getattr__(self, name: str) -> _Call:
        return _Call(getattr(self._target, name))


class LocalLauncher:
    def spawn(self, role: str, cls: type, resources: list[Resources], args: list[tuple]) -> list[Any]:
        return [LocalHandle(cls(*a)) for a in args]

    def get(self, refs: Any) -> Any:
        return refs

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
        self.seconds: dict[str, float] = {}
        self.self_teacher = config.teacher.model == "self"
        self.learners = self._spawn_learners(master_port)
        self.samplers = self._spawn_samplers()
        self.teachers = [] if self.self_teacher else self._spawn_teachers()
        self.rewarders = self._spawn_rewarders()
        self.version = 0

    # -- construction -------------------------------------------------------------------
    def _spawn_learners(self, master_port: int) -> list[Any]:
        cfg, world = self.config, self.config.learner.num_workers
        res = Resources(cfg.learner.num_cpus, cfg.learner.num_gpus)
        args = [(cfg, rank, world, "127.0.0.1", master_port) for rank in range(world)]
        return self.launcher.spawn("learner", Learner, [res] * world, args)

    def _spawn_samplers(self) -> list[Any]:
        cfg, n = self.config, self.config.rollout.num_workers
        teacher = None if self.self_teacher else cfg.teacher.model
        lora = cfg.student.lora if cfg.student.lora.enabled else None
        res = Resources(cfg.rollout.num_cpus, cfg.rollout.num_gpus)
        args = [
            (cfg.student.model, cfg.rollout, teacher, cfg.student.dtype, cfg.trainer.seed + 1000 * i, lora)
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
        return self.launcher.spawn("reward", RewardScorer, [Resources(cfg.num_cpus, cfg.num_gpus)], args)

    # -- the stages the controller calls -------------------------------------------------
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
        if self.self_teacher:
            return self._on_all_learners(lambda learner: learner.score_as_teacher.remote(batch, plan))
        shards = split_rows(batch, len(self.teachers))
        refs = [t.score.remote(shard, plan) for t, shard in zip(self.teachers, shards)]
        return _reassemble(batch, self.launcher.get(refs))

    @phase("reward")
    def reward(self, batch: RolloutBatch) -> RolloutBatch:
        if not self.rewarders:
            return batch
        return self.launcher.get(self.rewarders[0].score.remote(batch))

    @phase("learner")
    def train(self, batch: RolloutBatch) -> dict[str, float]:
        batch = batch.replace(token_count=batch.num_response_tokens)  # global normaliser
        shards = split_rows(batch, len(self.learners), keep_empty=True)  # every rank steps
        results = self.launcher.get([lr.train.remote(s) for lr, s in zip(self.learners, shards)])
        return _sum_metrics(results)

    @phase("sync")
    def sync_weights(self) -> int:
        """Push the learner's weights to every sampler; returns the new version."""
        update = self._on_all_learners(lambda learner: learner.export_weights.remote())
        shared = self.launcher.put(update)  # one copy in the object store for all samplers
        self.launcher.get([s.load_weights.remote(shared) for s in self.samplers])
        self.version = update.version
        return self.version

    # -- evaluation and persistence ------------------------------------------------------
    def greedy_texts(self, prompts: PromptBatch, max_new_tokens: int) -> list[str]:
        shards = split_prompts(prompts, len(self.samplers))
        refs = [s.greedy_texts.remote(shard, max_new_tokens) for s, shard in zip(self.samplers, shards)]
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
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts) if keep_empty or bounds[i + 1] > bounds[i]]


def split_prompts(prompts: PromptBatch, parts: int) -> list[PromptBatch]:
    """Contiguous row shards; pre-training text stays with the controller."""
    shards = []
    for rows in _row_chunks(prompts.size, parts):
        shards.append(
            PromptBatch(
                prompt_ids=prompts.prompt_ids[rows],
                prompt_mask=prompts.prompt_mask[rows],
                answers=prompts.answers[rows],
                completion_ids=None if prompts.completion_ids is None else prompts.completion_ids[rows],
                completion_mask=None if prompts.completion_mask is None else prompts.completion_mask[rows],
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
    {"learner/lr", "learner/grad_norm", "learner/skipped", "learner/version", "learner/nonfinite", "learner/empty_batch"}
)


def _sum_metrics(results: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = dict(results[0])
    for metrics in results[1:]:
        for key, value in metrics.items():
            if key not in SHARED_LEARNER_METRICS:
                total[key] = total.get(key, 0.0) + value
    return total
