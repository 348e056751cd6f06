"""Where metrics go: metrics.jsonl, wandb (offline without an API key), the console."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from protege.config import Config

CONSOLE_KEYS = (
    "learner/loss",
    "time/step",
    "rollout/response_length",
    "osd/acceptance_rate",
    "osd/updates",
    "osd/heldout_kl",
)


class MetricsLog:
    def __init__(self, config: Config):
        self.dir = Path(config.output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = (self.dir / "metrics.jsonl").open("a", encoding="utf-8")
        self.progress = config.logging.progress
        self.wandb = _start_wandb(config, self.dir)

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=max(row["step"], 0))
        if self.progress:
            print(_console_line(row), flush=True)

    def warning(self, message: str) -> None:
        print(f"[protege] {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


# Phases whose seconds are spent inside the workers' model calls (sampling, teacher forwards,
# reward scoring, the learner's forward/backward/optimizer step), by the lane they run in.
ROLLOUT_LANE = ("time/rollout", "time/teacher", "time/reward")
LEARNER_LANE = ("time/learner",)


def phase_accounting(
    phases: dict[str, float], metrics: dict[str, float], pipelined: bool
) -> dict[str, float]:
    """Derived cost metrics of one step from its phase seconds (worker-side) and wall time.

    `time/model`: seconds in the workers' model work, on the step's critical path: rollout lane
    plus learner lane when synchronous, the longer lane when pipelined (the lanes overlap).
    `time/overhead`: wall time minus that — scheduling, transport, (de)serialisation, the
    driver, weight sync, idle waits: what a framework adds to the models' own time.
    Tokens per second are response tokens sampled / teacher-scored per wall second.
    """
    step = phases.get("time/step", 0.0)
    rollout_lane = sum(phases.get(key, 0.0) for key in ROLLOUT_LANE)
    learner_lane = sum(phases.get(key, 0.0) for key in LEARNER_LANE)
    model = max(rollout_lane, learner_lane) if pipelined else rollout_lane + learner_lane
    overhead = max(step - model, 0.0)
    out = {
        "time/model": model,
        "time/overhead": overhead,
        "time/overhead_fraction": overhead / step if step > 0 else 0.0,
    }
    if step > 0:
        out["throughput/tokens_generated_per_s"] = metrics.get("rollout/tokens", 0.0) / step
        out["throughput/tokens_scored_per_s"] = metrics.get("teacher/tokens", 0.0) / step
    return out


def _start_wandb(config: Config, directory: Path):
    mode = config.logging.wandb
    if mode == "disabled":
        return None
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    import wandb

    return wandb.init(
        project=config.logging.project,
        name=config.logging.run_name,
        dir=str(directory),
        mode=mode,
        config=config.model_dump(),
        reinit="finish_previous",
    )


def _console_line(row: dict[str, Any]) -> str:
    parts = [f"step {row['step']:>5}"]
    for key, value in row.items():
        if key in CONSOLE_KEYS or key.startswith("eval"):
            parts.append(f"{key.split('/')[-1] if not key.startswith('eval') else key}={value:.4g}")
    return "  ".join(parts)
