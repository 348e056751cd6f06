"""One benchmark run in a fresh Python process, its result read back from stdout.

No run inherits another's state: a torch.distributed group left by protege's learner made
accelerate wrap TRL's model in DDP, and each Ray run starts its own local Ray instance. The
child prints `RESULT_PREFIX + json` (`report`); `run_fresh` returns that object.
"""

from __future__ import annotations

import json
import os
import subprocess

RESULT_PREFIX = "RESULT "
# torch.distributed rendezvous variables a parent may hold (a learner set them): with them
# accelerate would try to join a process group.
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")
DISTRIBUTED_ENV += ("MASTER_PORT",)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the rendezvous variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    return env | extra


def run_fresh(name: str, command: list[str], env: dict[str, str], timeout: float) -> dict:
    """Run `command`; the result it reported, or a RuntimeError with its stderr's tail."""
    done = subprocess.run(
        command, check=False, env=env, capture_output=True, text=True, timeout=timeout
    )
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(f"{name} failed:\n{done.stderr[-4000:]}")


def report(result: dict) -> None:
    """The child's side: print `result` where `run_fresh` reads it."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)
