"""The `protege` command: `protege check PRESET [a.b=value ...]`, `protege train PRESET ...`."""

from __future__ import annotations

import sys

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
        from protege.run import main as train

        train(rest[0], rest[1:])
        return 0
    print(USAGE, file=sys.stderr if command not in ("-h", "--help") else sys.stdout)
    return 0 if command in ("-h", "--help") else 2
