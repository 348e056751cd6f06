"""Resource requests against a cluster's free and per-node resources (the check made before
any placement group waits), and the failure types the launcher raises."""

from __future__ import annotations

from protege.launch import Resources, WorkerDied, resource_problem

ONE_NODE = [{"CPU": 2.0}]


def test_a_request_that_fits_passes():
    assert resource_problem("rollout", [Resources(0.25)] * 4, {"CPU": 1.0}, ONE_NODE) is None


def test_more_cpus_than_are_free_names_role_asked_and_available():
    problem = resource_problem("rollout", [Resources(0.25)] * 8, {"CPU": 1.25}, ONE_NODE)
    assert problem == (
        "rollout: 8 workers x 0.25 CPU = 2 CPU asked, 1.25 CPU available in the Ray cluster; "
        "lower rollout.num_workers or rollout.num_cpus, or add nodes"
    )


def test_a_gpu_on_a_cpu_only_cluster_is_refused_naming_the_key():
    problem = resource_problem("learner", [Resources(0.5, 1.0)], {"CPU": 2.0}, ONE_NODE)
    assert problem is not None and problem.startswith(
        "learner: each worker asks for 1 GPU (learner.num_gpus), but no node of the Ray "
        "cluster has that many (the largest has 0; 0 GPU available in all)"
    )


def test_a_worker_larger_than_every_node_is_refused_although_the_total_is_free():
    nodes = [{"CPU": 1.0}, {"CPU": 1.0}]
    problem = resource_problem("teacher-big", [Resources(1.5)], {"CPU": 2.0}, nodes)
    assert problem is not None and "(teachers.<name>.num_cpus)" in problem
    assert "the largest has 1" in problem


def test_worker_died_knows_which_roles_restart():
    assert WorkerDied("rollout", 0, "killed").restartable
    assert WorkerDied("teacher-t", 1, "killed").restartable
    assert WorkerDied("reward", 0, "killed").restartable
    learner = WorkerDied("learner", 0, "killed")
    assert not learner.restartable
    assert str(learner) == "learner worker 0 died: killed"
    assert str(WorkerDied("teacher-t", 1, "oom")) == "teacher 't' worker 1 died: oom"
