"""The controller's share of a checkpoint: step, data position and algorithm state.

The learner saves model/optimizer/scheduler itself; samplers draw from generators seeded
by (seed, step), so nothing else is needed to reproduce the uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

from protege.algorithms.registry import Algorithm
from protege.data import PromptSource


def save_controller_state(
    path: Path, next_step: int, prompts: PromptSource, algorithm: Algorithm
) -> None:
    """JSON only: the algorithm is rebuilt from the config, and its adaptive state (moving
    baselines, schedules) is restored from its `state_dict()`."""
    state = {
        "next_step": next_step,
        "prompts": prompts.state_dict(),
        "algorithm": {"name": algorithm.name, "state": algorithm.state_dict()},
    }
    (path / "controller.json").write_text(json.dumps(state))


def load_controller_state(path: Path, prompts: PromptSource, algorithm: Algorithm) -> int:
    """Restore the data position and `algorithm`'s state in place; returns the next step."""
    state = json.loads((path / "controller.json").read_text())
    saved = state["algorithm"]
    if saved["name"] != algorithm.name:
        raise ValueError(
            f"{path} was written by algorithm {saved['name']!r}, this run is {algorithm.name!r}; "
            "resume with the same algorithm or start a fresh output_dir"
        )
    prompts.load_state_dict(state["prompts"])
    algorithm.load_state_dict(saved["state"])
    return state["next_step"]


def latest_checkpoint(root: Path) -> Path | None:
    complete = [p for p in sorted(root.glob("step_*")) if (p / "controller.json").exists()]
    return complete[-1] if complete else None
