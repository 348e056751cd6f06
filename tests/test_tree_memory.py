"""benchmarks/tree_memory.py's per-process breakdown: each process of a job named by its
role (the driver, Ray's own servers, each protege actor), and the table sums to the peak."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from tree_memory import breakdown_markdown, role_of, run_metered

SITE = "/usr/lib/python3.11/site-packages/ray"


def test_each_process_is_named_by_its_role():
    assert role_of("python examples/gkd.py", root=True) == "driver"
    assert role_of(f"{SITE}/core/src/ray/gcs/gcs_server --log_dir=x") == "ray: gcs_server"
    assert role_of(f"{SITE}/core/src/ray/raylet/raylet --raylet_socket_name=x") == "ray: raylet"
    assert role_of("ray::DashboardAgent") == "ray: dashboard agent"
    assert role_of("ray::RuntimeEnvAgent") == "ray: runtime-env agent"
    assert role_of(f"python -u {SITE}/_private/log_monitor.py --session-dir=x") == (
        "ray: log monitor"
    )
    assert role_of(f"python -u {SITE}/autoscaler/_private/monitor.py") == (
        "ray: autoscaler monitor"
    )
    assert role_of("ray::IDLE") == "ray: idle worker"
    assert role_of("ray::Learner.train") == "actor: learner"
    assert role_of("ray::HFSampler") == "actor: rollout (sampler)"
    assert role_of("ray::ColocatedSampler.generate") == "actor: rollout + teacher (colocated)"
    assert role_of("ray::TeacherScorer.score") == "actor: teacher"
    assert role_of("ray::SomethingElse") == "actor: SomethingElse"


def test_the_breakdown_lists_every_process_and_sums_to_the_peak():
    child = "import time; x = bytearray(150_000_000); time.sleep(2)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    code, _, _, report = run_metered([sys.executable, "-c", parent], interval=0.2)
    assert code == 0
    rows = report["tree_breakdown"]
    assert [row["role"] for row in rows].count("driver") == 1
    assert rows[0]["rss_gib"] * 2**30 >= 150_000_000  # largest first: the child
    summed = sum(row["rss_gib"] for row in rows)
    assert abs(summed - report["tree_peak_rss_gib"]) < 0.01
    table = breakdown_markdown(report)
    assert " | driver | " in table and f"all {len(rows)} processes" in table
