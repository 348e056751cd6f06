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

from protege.errors import ProtegeError

# Roles whose actors Ray restarts after a crash (`trainer.worker_restarts`): they hold no
# training state, so a restarted one needs only the current weights and its shard again.
# Learner ranks hold the optimizer state and are never restarted.
RESTARTABLE_ROLES = ("rollout", "teacher-", "reward")


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 0.0
    num_gpus: float = 0.0


class WorkerDied(ProtegeError):
    """A worker's process died (killed, out of memory, its node gone). `restartable`: its role
    is restarted by Ray, so the call may be retried once the worker is back."""

    def __init__(self, role: str, index: int, reason: str):
        self.role, self.index = role, index
        self.restartable = restartable(role)
        name = f"teacher {role[len('teacher-') :]!r}" if role.startswith("teacher-") else role
        which = f"{name} worker {index}" if index >= 0 else f"a {name} worker"
        super().__init__(f"{which} died: {reason}")


class ResourcesUnavailable(ProtegeError):
    """A role asks for more CPUs/GPUs than the cluster has, or its placement timed out."""


def restartable(role: str) -> bool:
    return role.startswith(RESTARTABLE_ROLES)


def role_key(role: str) -> str:
    """The config section that sizes a role's workers (`teacher-<name>` -> `teachers`)."""
    return "teachers.<name>" if role.startswith("teacher-") else role


def resource_problem(
    role: str, resources: list[Resources], available: dict[str, float], nodes: list[dict]
) -> str | None:
    """Why `role`'s workers cannot be placed on the cluster, or None. `available`: the
    cluster's free CPU/GPU now (after the roles placed before); `nodes`: each node's total.
    A worker needs one node with room for it; the role needs its total free."""
    key = role_key(role)
    for kind, field in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        each = [getattr(r, field) for r in resources]
        asked, free = sum(each), available.get(kind, 0.0)
        largest = max((node.get(kind, 0.0) for node in nodes), default=0.0)
        if max(each, default=0.0) > largest + 1e-9:
            return (
                f"{role}: each worker asks for {max(each):g} {kind} ({key}.{field}), but no node "
                f"of the Ray cluster has that many (the largest has {largest:g}; {free:g} {kind} "
                f"available in all); lower {key}.{field}, or add a node with more {kind}s"
            )
        if asked > free + 1e-9:
            return (
                f"{role}: {len(each)} workers x {max(each):g} {kind} = {asked:g} {kind} asked, "
                f"{free:g} {kind} available in the Ray cluster; lower {key}.num_workers or "
                f"{key}.{field}, or add nodes"
            )
    return None


class Launcher(Protocol):
    serializes: bool  # whether a call's result is copied out of the worker as it returns

    def spawn(
        self,
        role: str,
        cls: type,
        resources: list[Resources],
        args: list[tuple],
        restarts: int = 0,
    ) -> list[Any]: ...

    def get(self, refs: Any) -> Any: ...

    def ready(self, ref: Any) -> bool: ...

    def put(self, value: Any) -> Any: ...

    def rendezvous_host(self, role: str, resources: list[Resources]) -> str: ...

    def wait_ready(self, handles: list[Any]) -> None: ...

    def shutdown(self) -> None: ...


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

    serializes = False  # a result is the worker's own object, shared with the caller

    def __init__(self, threads: bool = False):
        self.threads = threads

    def spawn(
        self,
        role: str,
        cls: type,
        resources: list[Resources],
        args: list[tuple],
        restarts: int = 0,
    ) -> list[Any]:
        return [LocalHandle(cls(*a), threaded=self.threads) for a in args]

    def wait_ready(self, handles: list[Any]) -> None:
        """In-process workers never die apart from the driver."""

    def shutdown(self) -> None:
        """Nothing is reserved in-process."""

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
    from protege.prompt_views import is_privileged
    from protege.teachers import TeacherClient, place_teacher

    learners = _spawn_learners(config, launcher, master_port)
    samplers = _spawn_samplers(config, launcher)
    by_placement = {"samplers": samplers, "colocated": samplers, "learner": learners}
    by_placement["live"] = learners
    teachers = []
    for spec in config.teachers:
        placement = place_teacher(spec, config.rollout.colocate_teacher)
        handles = by_placement.get(placement) or _spawn_teacher(spec, launcher, config)
        teachers.append(TeacherClient(spec.name, placement, handles, is_privileged(spec)))
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
    """The rollout workers; with `rollout.colocate_teacher` each holds the teacher's scorer
    too (protege.actors.colocated), built from the arguments a teacher actor would get."""
    from protege.actors.backends import sampler_class

    n, rollout = config.rollout.num_workers, config.rollout
    lora = config.student.lora if config.student.lora.enabled else None
    teacher = config.teacher.model  # the teacher that steers decoding (mixing, rewrite)
    teacher = None if config.teacher.on_server else teacher  # a server's model is not here
    args = [
        (
            config.student.model,
            rollout,
            teacher,
            rollout.dtype or config.student.dtype,  # the learner keeps student.dtype
            config.trainer.seed + 1000 * i,
            lora,
        )
        for i in range(n)
    ]
    resources = [Resources(rollout.num_cpus, rollout.num_gpus)] * n
    restarts, cls = config.trainer.worker_restarts, sampler_class(rollout.backend)
    if rollout.colocate_teacher:  # one teacher, checked by protege.colocation
        from protege.actors.colocated import ColocatedSampler

        scorer = teacher_worker(config.teacher, config)
        args = [(cls, sampler_args, *scorer) for sampler_args in args]
        cls = ColocatedSampler
    return launcher.spawn("rollout", cls, resources, args, restarts)


def _spawn_teacher(spec: Any, launcher: Launcher, config: Any) -> list[Any]:
    cls, args = teacher_worker(spec, config)
    resources = [Resources(spec.num_cpus, spec.num_gpus)] * spec.num_workers
    restarts, replicas = config.trainer.worker_restarts, [args] * spec.num_workers
    return launcher.spawn(f"teacher-{spec.name}", cls, resources, replicas, restarts)


def teacher_worker(spec: Any, config: Any) -> tuple[type, tuple]:
    """The scorer class of teacher `spec` and its constructor arguments (in its own actors,
    or colocated with the samplers)."""
    from protege.actors.backends import teacher_class

    cls, args = teacher_class(spec.backend), (spec.model, spec.dtype, spec.micro_batch_size)
    if config.build_algorithm().plan(0).cross_tokenizer != "none":  # protege.xtok
        args = (*args, config.student.model)
    if config.build_algorithm().plan(0).teacher_need == "kv":  # K-V outputs (kv_distill)
        from protege.actors.kv_teacher import KVTeacherScorer, kv_cache_dir

        cls = KVTeacherScorer
        args = (*args, config.student.model, spec.prefix, kv_cache_dir(spec, config))
    if spec.on_server:  # the model runs elsewhere: where it is and how to ask it
        from protege.teacher_server import limits_for

        args = (*args, spec.url, limits_for(spec), spec.name)
    return cls, args


def _spawn_rewarders(config: Any, launcher: Launcher) -> list[Any]:
    from protege.actors.reward import RewardScorer

    reward = config.reward
    if not reward.enabled:
        return []
    resources = [Resources(reward.num_cpus, reward.num_gpus)]
    args = [(reward, config.student.model)]
    return launcher.spawn("reward", RewardScorer, resources, args, config.trainer.worker_restarts)


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
