"""Slow tier: how protege starts and stops on Ray, as a user runs it (a driver subprocess).

SIGTERM ends the step in flight, checkpoints and exits 0; a request the cluster cannot
place is refused at once naming the role, the amount asked and what is available; the Ray
instance protege starts listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protege.checkpoint import latest_checkpoint
from protege.config import load_config
from protege.run import build_controller

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "RAY_ADDRESS": "local"}
BASE = ["trainer.batch_size=2", "data.test=null", "logging.wandb=disabled"]

pytestmark = pytest.mark.slow


def example(name: str, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "examples" / f"{name}.py"), *BASE, *overrides]


def step_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [row for row in map(json.loads, lines) if "learner/loss" in row]


def test_sigterm_checkpoints_exits_0_and_the_checkpoint_resumes(tmp_path):
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        driver = subprocess.Popen(
            example("gkd", "trainer.steps=50", f"output_dir={out}"),
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        deadline = time.monotonic() + 400
        while not step_rows(out) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        driver.send_signal(signal.SIGTERM)
        code = driver.wait(timeout=300)
    err = log.read_text()
    assert code == 0, err[-3000:]
    assert "SIGTERM: stopped after step" in err and "Traceback" not in err, err[-3000:]
    checkpoint = latest_checkpoint(out / "checkpoints")
    assert checkpoint is not None
    done = len(step_rows(out))
    assert checkpoint.name == f"step_{done:07d}"

    # the resume command the driver printed, run in-process (trainer.workers is free to change)
    assert "trainer.resume=auto" in err
    overrides = [*BASE, f"output_dir={out}", "trainer.resume=auto", f"trainer.steps={done + 1}"]
    overrides += ["trainer.workers=local", "logging.progress=false"]
    build_controller(load_config("gkd", overrides)).run()
    assert [row["step"] for row in step_rows(out)] == list(range(done + 1))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (f"rollout.num_workers={4 * (os.cpu_count() or 1)}", "rollout: "),
        ("learner.num_gpus=1", "learner: each worker asks for 1 GPU (learner.num_gpus)"),
    ],
)
def test_a_request_the_cluster_cannot_place_is_refused_at_once(override, expected, tmp_path):
    """Without the check the first waits forever with no message and the second prints
    autoscaler errors forever."""
    command = example("gkd", override, "rollout.num_cpus=1", f"output_dir={tmp_path / 'run'}")
    done = subprocess.run(
        command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0] and "available" in errors[0], errors


def test_protege_s_own_ray_instance_listens_on_loopback_only():
    """Every listening socket of the Ray processes protege starts (gcs, raylet, agents,
    workers, the driver) is on 127.0.0.1 (or its IPv4-mapped IPv6 form)."""
    script = """
import ipaddress, os, psutil, ray
from protege.actors.ray_actors import init_ray
init_ray()
@ray.remote(num_cpus=0)
def pid():
    return os.getpid()
ray.get(pid.remote())  # a worker process exists
me = psutil.Process()
listening = {
    (p.name(), c.laddr.ip)
    for p in [me, *me.children(recursive=True)]
    for c in p.net_connections(kind="inet")
    if c.status == psutil.CONN_LISTEN
}
print(sorted(listening))
def loopback(ip):
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1
assert listening and all(loopback(ip) for _, ip in listening), listening
"""
    env = {key: value for key, value in ENV.items() if key != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
