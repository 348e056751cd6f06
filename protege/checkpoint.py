"""The controller's share of a checkpoint: step, data position and algorithm state.

The learner saves model/optimizer/scheduler itself; samplers draw from generators seeded
by (seed, step), so nothing else is needed to reproduce the uninterrupted run.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from protege.algorithms.registry import Algorithm
from protege.data import PromptSource


def save_controller_state(
    path: Path, next_step: int, prompts: PromptSource, algorithm: Algorithm
) -> None:
    state = {"next_step": next_step, "prompts": prompts.state_dict()}
    (path / "controller.json").write_text(json.dumps(state))
    # Algorithms are frozen dataclasses; a few carry running statistics (a moving baseline).
    (path / "algorithm.pkl").write_bytes(pickle.dumps(algorithm))


def load_controller_state(path: Path, prompts: PromptSource) -> tuple[int, Algorithm]:
    state = json.loads((path / "controller.json").read_text())
    prompts.load_state_dict(state["prompts"])
    algorithm = pickle.loads((path / "algorithm.pkl").read_bytes())
    return state["next_step"], algorithm


def latest_checkpoint(root: Path) -> Path | None:
    complete = [p for p in sorted(root.glob("step_*")) if (p / "controller.json").exists()]
    return complete[-1] if complete else None
