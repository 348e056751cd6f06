"""`python examples/<preset>.py [a.b=value ...]`: the command line every example runs.

Light on purpose: `--help` and config errors are answered before torch, Ray or
transformers are imported (a cold import of those takes ~20 s).
"""

from __future__ import annotations

import sys

from protege.config import Config, load_config
from protege.errors import ProtegeError, report
from protege.progress import Progress, progress_enabled
from protege.usage import HELP_FLAGS, usage


def main(preset: str, argv: list[str] | None = None) -> dict[str, float]:
    """Train with preset `preset` plus `argv` overrides, then print accuracy before/after.
    `--help` prints every key; a known bad input exits with code 2 and one `error:` block."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if HELP_FLAGS & set(argv):
            print(usage(preset))
            raise SystemExit(0)
        config = load_config(preset, argv)
        result = train(config)
    except ProtegeError as error:
        raise SystemExit(report(error)) from None
    if "eval_before/accuracy" in result:
        print(
            f"student accuracy: {result['eval_before/accuracy']:.3f} -> "
            f"{result['eval_after/accuracy']:.3f} ({config.algorithm['name']}, "
            f"{config.trainer.steps} steps; final model in {config.output_dir}/final)"
        )
    return result


def train(config: Config) -> dict[str, float]:
    """Build the run and train it under a progress bar, closed before anything else prints."""
    from protege.run import build_controller

    enabled = progress_enabled(config.logging.progress, sys.stderr)
    progress = Progress(config.trainer.steps, enabled)
    try:
        return build_controller(config).run(on_step=progress.update)
    finally:
        progress.close()
