"""Where metrics go: metrics.jsonl, wandb (offline without an API key), the console."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from protege.config import Config

CONSOLE_KEYS = ("learner/loss", "time/step", "rollout/response_length")


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
