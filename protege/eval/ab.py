"""A/B comparison of training configurations: several seeds per arm, bootstrap 95% CIs of
each arm's mean and a paired test of each arm against a baseline arm (paired by seed).

    python -m protege.eval.ab gkd minillm --seeds 3 --set trainer.steps=100
    python -m protege.eval.ab --arm kd gkd algorithm.lmbda=0 --arm on-policy gkd algorithm.lmbda=1 \\
        --seeds 3 --baseline kd --metric eval_after/accuracy

Every run is in-process (`trainer.workers=local`) unless `--set trainer.workers=ray`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from protege.eval.harness import (
    Arm,
    ArmResult,
    markdown_table,
    run_experiment,
    summarise,
    write_json,
)


def seed_overrides(algorithm_name: str, seed: int) -> list[str]:
    """Overrides that make run `seed` differ in every random stream: sampling, data order,
    and the algorithm's own schedule when it has a `seed` hyper-parameter (GKD's λ draws)."""
    from protege.algorithms.registry import ALGORITHMS

    overrides = [f"trainer.seed={seed}", f"data.shuffle_seed={seed}"]
    cls = ALGORITHMS.get(algorithm_name)
    if cls is not None and any(f.name == "seed" for f in dataclasses.fields(cls)):
        overrides.append(f"algorithm.seed={seed}")
    return overrides


def run_arm(
    preset: str, overrides: Sequence[str], seed: int, output_dir: str
) -> tuple[dict[str, float], float]:
    """Train one arm for one seed; (final metrics, wall seconds)."""
    from protege.config import load_config
    from protege.run import build_controller

    base = ["trainer.workers=local", "logging.wandb=disabled", "logging.progress=false"]
    probe = load_config(preset, [*base, *overrides])
    seeded = [
        *base,
        *overrides,
        *seed_overrides(probe.algorithm["name"], seed),
        f"output_dir={output_dir}",
    ]
    started = time.perf_counter()
    result = build_controller(load_config(preset, seeded)).run()
    return result, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    short = [spec for spec in args.arm or [] if len(spec) < 2]
    if short:
        print(
            f"error: --arm needs LABEL PRESET [a.b=value ...], got {' '.join(short[0])!r}",
            file=sys.stderr,
        )
        return 2
    arms = [Arm(preset, params={"preset": preset}) for preset in args.presets]
    arms += [Arm(s[0], tuple(s[2:]), params={"preset": s[1]}) for s in args.arm or []]
    if not arms:
        print(
            "error: name at least one preset or --arm LABEL PRESET [a.b=value ...]", file=sys.stderr
        )
        return 2
    labels = [arm.name for arm in arms]
    if len(set(labels)) != len(labels):
        print(f"error: arm labels must be distinct, got {labels}", file=sys.stderr)
        return 2
    baseline = args.baseline or labels[0]
    if baseline not in labels:
        print(f"error: --baseline {baseline!r} is not one of {', '.join(labels)}", file=sys.stderr)
        return 2
    from protege.config import ConfigError
    from protege.data import DataError

    def run(arm: Arm, seed: int) -> ArmResult:
        out = str(Path(args.output_dir) / arm.name / f"seed{seed}")
        metrics, seconds = run_arm(arm.params["preset"], [*args.set, *arm.overrides], seed, out)
        if args.metric not in metrics:
            known = ", ".join(sorted(metrics)) or "none (is data.test set?)"
            raise MissingMetric(f"run gave no {args.metric!r}; metrics: {known}")
        return ArmResult(seed, metrics, seconds=seconds)

    try:
        results = run_experiment(arms, range(args.seeds), run)
    except (ConfigError, DataError, ValueError, MissingMetric) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summaries = summarise(results, [args.metric], baseline)
    print(markdown_table(summaries, [args.metric], baseline))
    if args.json:
        write_json(Path(args.json), results, summaries, metric=args.metric, baseline=baseline)
    return 0


class MissingMetric(Exception):
    """A run did not report the metric being compared."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m protege.eval.ab", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "presets", nargs="*", help="presets (configs/<name>.yaml or a path), one arm each"
    )
    parser.add_argument(
        "--arm",
        nargs="+",
        action="append",
        metavar="WORD",
        help="LABEL PRESET [a.b=value ...]: a labelled arm with its own overrides (repeatable)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="a.b=value", help="overrides for every arm"
    )
    parser.add_argument("--metric", default="eval_after/accuracy", help="metric to compare")
    parser.add_argument("--baseline", help="arm the others are tested against (default: the first)")
    parser.add_argument("--output-dir", default="runs/ab", help="where each run writes")
    parser.add_argument("--json", help="also write runs and summaries to this JSON file")
    return parser


if __name__ == "__main__":
    sys.exit(main())
