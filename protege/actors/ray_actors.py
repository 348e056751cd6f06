"""Ray wrappers: the only module that imports ray.

Each role's plain class becomes an actor with the role's fractional CPUs/GPUs, placed in
one placement group per role (PACK: bundles share nodes when they fit, spill over to other
nodes of a cluster when they do not).
"""

from __future__ import annotations

import os
from typing import Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from protege.launch import Resources

# Threads per actor: several actors share few cores; oversubscription made CPU steps ~20x
# slower on 2 cores.
ACTOR_ENV = {
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def init_ray(address: str | None = None) -> None:
    """Join the cluster a `ray job submit` runs in (RAY_ADDRESS), an instance started with
    `ray start` on this machine, or else a new local one (RAY_ADDRESS=local forces that)."""
    if ray.is_initialized():
        return
    ray.init(
        address=address or os.environ.get("RAY_ADDRESS") or None,
        runtime_env={"env_vars": ACTOR_ENV},
        include_dashboard=False,
        log_to_driver=True,
    )


class RayLauncher:
    """Builds workers as Ray actors; `get`/`put` are ray.get/ray.put."""

    def __init__(self) -> None:
        init_ray()
        self.groups: list[Any] = []
        self._reserved: dict[str, Any] = {}  # role -> placement group made before its spawn

    def rendezvous_host(self, role: str, resources: list[Resources]) -> str:
        """The IP of the node that will hold the role's first worker (rank 0 of a process
        group): the role's placement group is made now and reused by `spawn`."""
        group = self._reserve(role, resources)
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
        return ray.get(_node_ip.options(scheduling_strategy=strategy).remote())

    def _reserve(self, role: str, resources: list[Resources]) -> Any:
        if role not in self._reserved:
            bundles = [_bundle(r) for r in resources]
            name = f"protege-{role}-{os.getpid()}"
            group = placement_group(bundles, strategy="PACK", name=name)
            ray.get(group.ready())
            self.groups.append(group)
            self._reserved[role] = group
        return self._reserved[role]

    def spawn(
        self, role: str, cls: type, resources: list[Resources], args: list[tuple]
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
            }
            handles.append(actor_cls.options(**options).remote(*arguments))
        return handles

    def get(self, refs: Any) -> Any:
        return ray.get(refs)

    def put(self, value: Any) -> Any:
        return ray.put(value)

    def ready(self, ref: Any) -> bool:
        """Whether `get(ref)` would return without waiting."""
        done, _ = ray.wait([ref], timeout=0)
        return bool(done)

    def shutdown(self) -> None:
        for group in self.groups:
            ray.util.remove_placement_group(group)
        self.groups.clear()


@ray.remote(num_cpus=0)
def _node_ip() -> str:
    return ray.util.get_node_ip_address()


def _bundle(resources: Resources) -> dict[str, float]:
    bundle = {"CPU": resources.num_cpus}
    if resources.num_gpus:
        bundle["GPU"] = resources.num_gpus
    return bundle
