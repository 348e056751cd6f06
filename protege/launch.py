"""Launching the role workers: in this process, or as Ray actors.

A launcher hands back handles whose methods are called as `handle.method.remote(...)` and
whose results (a Ray ObjectRef, or an in-process Future / value) are resolved with
`launcher.get(...)`, so the same pipeline code drives both. A call's result may be passed
straight to another worker's call: it is resolved there. `protege.actors.ray_actors` holds
the Ray launcher (the only module importing Ray).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 0.0
    num_gpus: float = 0.0


class Launcher(Protocol):
    def spawn(
        self, role: str, cls: type, resources: list[Resources], args: list[tuple]
    ) -> list[Any]: ...

    def get(self, refs: Any) -> Any: ...

    def ready(self, ref: Any) -> bool: ...

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

    def ready(self, ref: Any) -> bool:
        """Whether `get(ref)` would return without waiting."""
        return not isinstance(ref, Future) or ref.done()

    def rendezvous_host(self, role: str, resources: list[Resources]) -> str:
        return "127.0.0.1"  # every worker is in this process

    def put(self, value: Any) -> Any:
        return value


@dataclass
class Roles:
    """Every role's handles, spawned once for a run."""

    learners: list[Any]
    samplers: list[Any]
    teachers: list[Any]  # protege.teachers.TeacherClient, in config order
    rewarders: list[Any]
    nccl_sync: bool = False  # weights broadcast learner rank 0 -> vLLM engines over NCCL


def spawn_roles(config: Any, launcher: Launcher, master_port: int) -> Roles:
    """Spawn learners, samplers, each teacher's scorers and the rewarder, and place every
    teacher (its own actors, the samplers or the learner: decided here, once)."""
    from protege.teachers import TeacherClient, place_teacher

    learners = _spawn_learners(config, launcher, master_port)
    samplers = _spawn_samplers(config, launcher)
    by_placement = {"samplers": samplers, "learner": learners}
    teachers = []
    for spec in config.teachers:
        placement = place_teacher(spec)
        handles = by_placement.get(placement) or _spawn_teacher(spec, launcher, config)
        teachers.append(TeacherClient(spec.name, placement, handles))
    roles = Roles(learners, samplers, teachers, _spawn_rewarders(config, launcher))
    roles.nccl_sync = _join_weight_broadcast(config, launcher, roles)
    return roles


def _spawn_learners(config: Any, launcher: Launcher, master_port: int) -> list[Any]:
    from protege.actors.learner import Learner

    world = config.learner.num_workers
    resources = [Resources(config.learner.num_cpus, config.learner.num_gpus)] * world
    # Rank 0's node hosts the process group's rendezvous (the ranks may span nodes).
    host = launcher.rendezvous_host("learner", resources) if world > 1 else "127.0.0.1"
    args = [(config, rank, world, host, master_port) for rank in range(world)]
    return launcher.spawn("learner", Learner, resources, args)


def _spawn_samplers(config: Any, launcher: Launcher) -> list[Any]:
    from protege.actors.backends import sampler_class

    n, rollout = config.rollout.num_workers, config.rollout
    lora = config.student.lora if config.student.lora.enabled else None
    teacher = config.teacher.model  # the teacher that steers decoding (mixing, rewrite)
    args = [
        (
            config.student.model,
            rollout,
            teacher,
            config.student.dtype,
            config.trainer.seed + 1000 * i,
            lora,
        )
        for i in range(n)
    ]
    resources = [Resources(rollout.num_cpus, rollout.num_gpus)] * n
    return launcher.spawn("rollout", sampler_class(rollout.backend), resources, args)


def _spawn_teacher(spec: Any, launcher: Launcher, config: Any) -> list[Any]:
    from protege.actors.backends import teacher_class

    cls, args = teacher_class(spec.backend), (spec.model, spec.dtype, spec.micro_batch_size)
    if config.build_algorithm().plan(0).teacher_need == "kv":  # K-V outputs (kv_distill)
        from protege.actors.kv_teacher import KVTeacherScorer, kv_cache_dir

        cls = KVTeacherScorer
        args = (*args, config.student.model, spec.prefix, kv_cache_dir(spec, config))
    resources = [Resources(spec.num_cpus, spec.num_gpus)] * spec.num_workers
    return launcher.spawn(f"teacher-{spec.name}", cls, resources, [args] * spec.num_workers)


def _spawn_rewarders(config: Any, launcher: Launcher) -> list[Any]:
    from protege.actors.reward import RewardScorer

    reward = config.reward
    if not reward.enabled:
        return []
    resources = [Resources(reward.num_cpus, reward.num_gpus)]
    return launcher.spawn("reward", RewardScorer, resources, [(reward, config.student.model)])


def _join_weight_broadcast(config: Any, launcher: Launcher, roles: Roles) -> bool:
    """`rollout.weight_sync=nccl`: learner rank 0 and the vLLM engines' GPU workers form
    one NCCL group, and every sync is a broadcast instead of an object-store copy (the
    combination was checked at start-up)."""
    if config.rollout.weight_sync != "nccl":
        return False
    receivers = launcher.get([s.weight_receivers.remote() for s in roles.samplers])
    calls = [
        rank.init_weight_broadcast.remote(roles.samplers, receivers) for rank in roles.learners
    ]
    launcher.get(calls)
    return True
