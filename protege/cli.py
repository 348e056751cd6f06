"""The command lines: `python examples/<preset>.py [a.b=value ...]` (`run_example`) and the
`protege` command, `protege check PRESET [a.b=value ...]`, `protege train PRESET ...`.

Light on purpose: `--help` and config errors are answered before torch, Ray or
transformers are imported (a cold import of those takes ~20 s).
"""

from __future__ import annotations

import sys

from protege.config import Config, load_config
from protege.errors import ProtegeError, report
from protege.progress import Progress, progress_enabled
from protege.usage import HELP_FLAGS, usage

USAGE = """usage: protege check PRESET [a.b=value ...]   will this run work? (see protege.check)
       protege train PRESET [a.b=value ...]   train (as python examples/<preset>.py does)
PRESET is a name in configs/ (gkd, minillm, ...) or a YAML file."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "check":
        from protege.check import main as check

        return check(rest)
    if command == "train" and rest:
        run_example(rest[0], rest[1:])
        return 0
    print(USAGE, file=sys.stderr if command not in ("-h", "--help") else sys.stdout)
    return 0 if command in ("-h", "--help") else 2


def run_example(preset: str, argv: list[str] | None = None) -> dict[str, float]:
    """Train with preset `preset` plus `argv` overrides, then print what evaluation measured
    before -> after (the last line). `--help` prints every key; a known bad input exits with
    code 2 and one `error:` block."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if HELP_FLAGS & set(argv):
            print(usage(preset))
            raise SystemExit(0)
        config = load_config(preset, argv)
        result = train(config)
    except ProtegeError as error:
        raise SystemExit(report(error)) from None
    from protege.run import result_line

    print(result_line(config, result))
    return result


def train(config: Config) -> dict[str, float]:
    """Build the run and train it under a progress bar, closed before anything else prints."""
    from protege.controller import Interrupted
    from protege.run import build_controller, stop_on_sigterm

    enabled = progress_enabled(config.logging.progress, sys.stderr)
    progress = Progress(config.trainer.steps, enabled)
    try:
        controller = build_controller(config)
        stop_on_sigterm(controller)  # SIGTERM: finish the step, checkpoint, exit 0
        return controller.run(on_step=progress.update)
    except Interrupted as stopped:  # a checkpoint was written; the message says how to resume
        progress.close()
        print(f"[protege] {stopped}", file=sys.stderr, flush=True)
        raise SystemExit(0) from None
    finally:
        progress.close()
