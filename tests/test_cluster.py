"""Slow tier: a simulated multi-node Ray cluster on this machine (`ray.cluster_utils`).

Workers spread over the nodes; a node removed mid-run takes its sampler/teacher actors down,
Ray places them on another node, and the run finishes every step. A placement the nodes
cannot grant times out naming the role. protege joins a running cluster only when told to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group, remove_placement_group

from protege.actors.ray_actors import RayLauncher
from protege.config import load_config
from protege.launch import Resources, ResourcesUnavailable
from protege.run import build_controller

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """A head (the driver's node, 1 CPU and one pretend GPU: `learner.num_gpus=1` pins the
    learner there, `learner.num_cpus=1` fills it) and two 1-CPU worker nodes."""
    if ray.is_initialized():
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
    nodes.add_node(num_cpus=1)
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    yield nodes
    if ray.is_initialized():
        ray.shutdown()
    nodes.shutdown()


def node_of(handle) -> str:
    return ray.get(handle.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def test_a_removed_node_s_actors_come_back_elsewhere_and_every_step_runs(cluster, tmp_path, capfd):
    out = tmp_path / "run"
    config = load_config(
        "gkd",
        [
            f"trainer.ray_address={cluster.address}",
            "rollout.num_workers=2",
            "learner.num_gpus=1",
            "learner.num_cpus=1",
            "trainer.steps=4",
            "trainer.batch_size=2",
            "data.test=null",
            "logging.wandb=disabled",
            "logging.progress=false",
            f"output_dir={out}",
        ],
    )
    controller = build_controller(config)
    pipeline = controller.pipeline
    movable = [*pipeline.samplers, *pipeline.teachers[0].handles]
    head, removed = cluster.head_node.node_id, []

    def remove_a_node(k, row):
        if k != 1:
            return
        placed = [node_of(handle) for handle in movable]
        assert node_of(pipeline.learners[0]) == head
        assert head not in placed  # the head's CPU went to the learner: workers spread out
        victim = next(n for n in cluster.worker_nodes if n.node_id == node_of(pipeline.samplers[0]))
        removed.append(victim.node_id)
        cluster.remove_node(victim)

    try:
        controller.run(on_step=remove_a_node)
        assert removed and all(node_of(handle) != removed[0] for handle in movable)
    finally:
        pipeline.launcher.shutdown()
        ray.shutdown()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "learner/loss" in row] == [0, 1, 2, 3]
    err = capfd.readouterr().err
    assert f"joining the Ray cluster at {cluster.address} (trainer.ray_address)" in err
    assert "rollout worker 0 died" in err
    cluster.add_node(num_cpus=1)  # back to three nodes for the next test
    cluster.wait_for_nodes()


def test_a_placement_no_node_can_grant_times_out_naming_the_role(cluster):
    """0.5 CPU held on every node leaves 1.5 CPU free in all, but no node has the 0.75 CPU one
    worker asks for: the check passes, the placement cannot, and the wait is bounded."""
    launcher = RayLauncher(cluster.address, placement_timeout_s=2)
    holder = placement_group([{"CPU": 0.5}] * 3, strategy="STRICT_SPREAD")
    ray.get(holder.ready(), timeout=60)
    try:
        with pytest.raises(
            ResourcesUnavailable,
            match=r"rollout: .* not granted within "
            r"trainer.placement_timeout_s=2 s; 1.5 CPU, 1 GPU available",
        ):
            launcher.spawn("rollout", object, [Resources(0.75)], [()])
    finally:
        remove_placement_group(holder)
        launcher.shutdown()
        ray.shutdown()


def test_protege_joins_a_running_cluster_only_when_told(cluster):
    """With a cluster running on the machine, a run without RAY_ADDRESS starts its own
    instance; with RAY_ADDRESS it joins that cluster and says so."""
    script = (
        "import ray; from protege.actors.ray_actors import init_ray; init_ray(); "
        "print(ray.get_runtime_context().gcs_address)"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    runs = {}
    for name, extra in (("own", {}), ("joined", {"RAY_ADDRESS": cluster.address})):
        runs[name] = subprocess.run(
            [sys.executable, "-c", script],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    assert runs["own"].stdout.split()[-1] != cluster.address
    assert "joining" not in runs["own"].stderr
    assert runs["joined"].stdout.split()[-1] == cluster.address
    assert f"joining the Ray cluster at {cluster.address} (RAY_ADDRESS)" in runs["joined"].stderr
