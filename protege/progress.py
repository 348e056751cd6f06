"""The console view of a run: one progress bar, `step k/N`, the ETA and the key metrics.

Drawn on stderr with tqdm, so stdout keeps only the result line (printed after the bar is
closed, the last thing a run prints). `logging.progress=auto` draws it on a terminal and
stays quiet otherwise (a log file gets metrics.jsonl, not carriage returns); `true` draws it
anyway, `false` never.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

# What the bar shows of each step's row, by its short name: the loss the learner minimised,
# the summed reward, how long the responses are, and the step's wall time.
KEY_METRICS = {
    "learner/loss": "loss",
    "reward/total": "reward",
    "rollout/response_length": "len",
    "time/step": "s/step",
}
BAR_FORMAT = "step {n_fmt}/{total_fmt} |{bar:20}| ETA {remaining} ({elapsed} elapsed){postfix}"


def progress_enabled(setting: bool | str, stream: TextIO) -> bool:
    """`logging.progress`: auto draws the bar only on a terminal."""
    if setting == "auto":
        return bool(getattr(stream, "isatty", lambda: False)())
    return bool(setting)


class Progress:
    """`update(k, row)` after each step k (the controller's `on_step`); `close()` at the end.
    The bar starts at the first step it sees, so a resumed run counts from its start step."""

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None):
        self.total, self.enabled = total, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.bar: tqdm | None = None

    def update(self, k: int, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(
                total=self.total, initial=k, file=self.stream, bar_format=BAR_FORMAT,
                dynamic_ncols=True, leave=True,
            )  # fmt: skip
        self.bar.set_postfix_str(key_metrics(row), refresh=False)
        self.bar.update(k + 1 - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def key_metrics(row: dict[str, Any]) -> str:
    """`loss=0.412 len=6.5 s/step=0.031`: the KEY_METRICS the row has."""
    return " ".join(f"{short}={row[key]:.4g}" for key, short in KEY_METRICS.items() if key in row)


def say(message: str) -> None:
    """A line on stderr that leaves a drawn bar intact (it is redrawn below the line)."""
    tqdm.write(message, file=sys.stderr)
