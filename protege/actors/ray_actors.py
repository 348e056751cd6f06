"""Ray wrappers: the only module that imports ray.

Each role's plain class becomes an actor with the role's fractional CPUs/GPUs, placed in
one placement group per role (PACK: bundles share nodes when they fit, spill over to other
nodes of a cluster when they do not). A role's request is checked against the cluster's
free resources before its group is made, and the wait for the group is bounded
(`trainer.placement_timeout_s`). Rollout, teacher and reward actors restart after a crash
(`trainer.worker_restarts`); a dead actor surfaces as `protege.launch.WorkerDied`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from protege.launch import Resources, ResourcesUnavailable, WorkerDied, resource_problem

# Threads per actor: several actors share few cores; oversubscription made CPU steps ~20x
# slower on 2 cores.
ACTOR_ENV = {
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
LOCAL = "local"  # RAY_ADDRESS=local: protege's own instance, as when it is unset
# Ray settings of protege's own instance (never of a cluster it joins), read from the
# environment by the raylet it starts: no idle Python worker prestarted for the driver (~80 MB
# of RSS that no protege role uses; every actor gets its own worker process anyway).
OWN_INSTANCE_ENV = {"RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0"}


def log(message: str) -> None:
    print(f"[protege] {message}", file=sys.stderr, flush=True)


def init_ray(address: str | None = None) -> None:
    """Join the cluster named by `trainer.ray_address` or RAY_ADDRESS (which `ray job
    submit` sets), saying so; else start protege's own instance, every server of it bound
    to 127.0.0.1 and no dashboard. A Ray instance this process already joined is used."""
    if ray.is_initialized():
        log(
            f"using the Ray cluster this process already joined ({ray.get_runtime_context().gcs_address})"
        )
        return
    source = "trainer.ray_address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or LOCAL
    options = {"runtime_env": {"env_vars": ACTOR_ENV}, "log_to_driver": True}
    if address != LOCAL:
        log(f"joining the Ray cluster at {address} ({source})")
        ray.init(address=address, **options)
        return
    with _loopback_only(), _environment(OWN_INSTANCE_ENV):
        ray.init(address=LOCAL, include_dashboard=False, **options)


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray binds its servers to the node IP it detects, and to every interface unless that IP
    is 127.0.0.1. Its detection returns 127.0.0.1 where multi-node clusters are off (Ray's
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER switch): set for this start-up, in this process and in
    the Ray processes it starts (gcs, raylet, agents, workers inherit it)."""
    from ray._private import ray_constants

    variable, saved = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, ray_constants.ENABLE_RAY_CLUSTER
    before = os.environ.get(variable)
    os.environ[variable], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if before is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = before


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """`variables` set for the start-up (the Ray processes it starts inherit them), unless the
    user set them already; restored after."""
    added = {key: value for key, value in variables.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class RayLauncher:
    """Builds workers as Ray actors; `get`/`put` are ray.get/ray.put, a dead actor's error
    raised as WorkerDied naming its role."""

    serializes = True  # a result is in the object store once its call has returned

    def __init__(self, address: str | None = None, placement_timeout_s: float = 300.0) -> None:
        init_ray(address)
        self.placement_timeout_s = placement_timeout_s
        self.groups: list[Any] = []
        self._reserved: dict[str, Any] = {}  # role -> placement group made before its spawn
        self._actors: dict[str, tuple[str, int]] = {}  # actor id -> (role, index)

    def rendezvous_host(self, role: str, resources: list[Resources]) -> str:
        """The IP of the node that will hold the role's first worker (rank 0 of a process
        group): the role's placement group is made now and reused by `spawn`."""
        group = self._reserve(role, resources)
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
        return ray.get(_node_ip.options(scheduling_strategy=strategy).remote())

    def _reserve(self, role: str, resources: list[Resources]) -> Any:
        if role not in self._reserved:
            check_resources(role, resources)
            bundles = [_bundle(r) for r in resources]
            name = f"protege-{role}-{os.getpid()}"
            group = placement_group(bundles, strategy="PACK", name=name)
            self.groups.append(group)
            if not group.wait(self.placement_timeout_s):
                raise ResourcesUnavailable(
                    f"{role}: its workers' resources ({bundles}) were not granted within "
                    f"trainer.placement_timeout_s={self.placement_timeout_s:g} s; "
                    f"{_free_resources()} available. Free resources or ask for fewer"
                )
            self._reserved[role] = group
        return self._reserved[role]

    def spawn(
        self,
        role: str,
        cls: type,
        resources: list[Resources],
        args: list[tuple],
        restarts: int = 0,
    ) -> list[Any]:
        group = self._reserve(role, resources)
        del self._reserved[role]  # a later spawn of the same role gets its own group
        actor_cls = ray.remote(cls)
        handles = []
        for index, (res, arguments) in enumerate(zip(resources, args)):
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
            options = {
                "num_cpus": res.num_cpus,
                "num_gpus": res.num_gpus,
                "scheduling_strategy": strategy,
                "max_restarts": restarts,  # its calls are retried by the pipeline, not by Ray
            }
            handle = actor_cls.options(**options).remote(*arguments)
            self._actors[handle._actor_id.hex()] = (role, index)
            handles.append(handle)
        return handles

    def get(self, refs: Any) -> Any:
        """ray.get, except that a list returns as soon as any of its calls failed (a rank
        waiting in a collective for a dead peer would otherwise hold it forever)."""
        try:
            if isinstance(refs, list) and len(refs) > 1:
                pending = list(dict.fromkeys(refs))  # ray.wait refuses a repeated ref
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    ray.get(done)  # raises now if that call failed
            return ray.get(refs)
        except ray.exceptions.RayActorError as error:
            raise self._died(error) from None

    def wait_ready(self, handles: list[Any]) -> None:
        """Wait until every actor of `handles` is alive: Ray refuses calls to a restarting
        actor (ActorUnavailableError), so ask again until it answers, it is dead for good
        (its restarts spent), or `trainer.placement_timeout_s` passed (no room to restart)."""
        deadline = time.monotonic() + self.placement_timeout_s
        for handle in handles:
            while True:
                try:
                    ray.get(handle.__ray_ready__.remote())
                    break
                except ray.exceptions.ActorUnavailableError as error:
                    if time.monotonic() > deadline:
                        raise self._died(error) from None
                    time.sleep(0.2)
                except ray.exceptions.RayActorError as error:
                    raise self._died(error) from None

    def put(self, value: Any) -> Any:
        return ray.put(value)

    def ready(self, ref: Any) -> bool:
        """Whether `get(ref)` would return without waiting."""
        done, _ = ray.wait([ref], timeout=0)
        return bool(done)

    def _died(self, error: Exception) -> WorkerDied:
        role, index = self._actors.get(getattr(error, "actor_id", None) or "", ("unknown", -1))
        reason = str(getattr(error, "cause", None) or error).strip().splitlines()
        return WorkerDied(role, index, reason[-1] if reason else type(error).__name__)

    def shutdown(self) -> None:
        for group in self.groups:
            ray.util.remove_placement_group(group)
        self.groups.clear()


def check_resources(role: str, resources: list[Resources]) -> None:
    """Refuse a request the cluster cannot place now, before a placement group waits on it."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    problem = resource_problem(role, resources, ray.available_resources(), nodes)
    if problem:
        raise ResourcesUnavailable(problem)


def _free_resources() -> str:
    free = ray.available_resources()
    return ", ".join(f"{free.get(kind, 0.0):g} {kind}" for kind in ("CPU", "GPU"))


@ray.remote(num_cpus=0)
def _node_ip() -> str:
    return ray.util.get_node_ip_address()


def _bundle(resources: Resources) -> dict[str, float]:
    bundle = {"CPU": resources.num_cpus}
    if resources.num_gpus:
        bundle["GPU"] = resources.num_gpus
    return bundle
