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
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from protege.eval.stats import Interval, bootstrap_ci, paired_test


@dataclass(frozen=True)
class ArmSummary:
    name: str
    values: tuple[float, ...]  # one per seed
    mean: Interval
    versus_baseline: Interval | None = None  # mean of (arm − baseline), paired by seed
    p_value: float | None = None  # two-sided paired sign-flip test against the baseline


def summarize(
    results: dict[str, Sequence[float]],
    baseline: str | None = None,
    level: float = 0.95,
    seed: int = 0,
) -> list[ArmSummary]:
    """One summary per arm, in the order given; arms are paired with the baseline by index
    (the i-th value of every arm must come from the same seed)."""
    if baseline is not None and baseline not in results:
        raise ValueError(f"baseline arm {baseline!r} is not one of {', '.join(results)}")
    summaries = []
    for name, values in results.items():
        values = tuple(float(v) for v in values)
        summary = ArmSummary(name, values, bootstrap_ci(values, level, seed=seed))
        if baseline is not None and name != baseline:
            paired = paired_test(values, results[baseline], level, seed=seed)
            summary = dataclasses.replace(
                summary, versus_baseline=paired.difference, p_value=paired.p_value
            )
        summaries.append(summary)
    return summaries


def format_table(summaries: Sequence[ArmSummary], metric: str, baseline: str | None = None) -> str:
    """A Markdown table: arm | metric mean [95% CI] | Δ vs baseline [CI] | paired p | n."""
    versus = f"Δ vs {baseline}" if baseline else "Δ vs baseline"
    lines = [
        f"| arm | {metric} mean [95% CI] | {versus} [95% CI] | paired p | seeds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        delta = "—" if s.versus_baseline is None else _signed(s.versus_baseline)
        p_value = "—" if s.p_value is None else f"{s.p_value:.3f}"
        lines.append(f"| {s.name} | {s.mean} | {delta} | {p_value} | {len(s.values)} |")
    return "\n".join(lines)


def _signed(interval: Interval) -> str:
    return f"{interval.mean:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}]"


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
    arms = [(preset, preset, []) for preset in args.presets]
    arms += [(spec[0], spec[1], spec[2:]) for spec in args.arm or []]
    if not arms:
        print(
            "error: name at least one preset or --arm LABEL PRESET [a.b=value ...]", file=sys.stderr
        )
        return 2
    labels = [label for label, _, _ in arms]
    if len(set(labels)) != len(labels):
        print(f"error: arm labels must be distinct, got {labels}", file=sys.stderr)
        return 2
    baseline = args.baseline or labels[0]
    if baseline not in labels:
        print(f"error: --baseline {baseline!r} is not one of {', '.join(labels)}", file=sys.stderr)
        return 2
    from protege.config import ConfigError
    from protege.data import DataError

    results: dict[str, list[float]] = {}
    raw: dict[str, list[dict]] = {}
    try:
        for label, preset, overrides in arms:
            for seed in range(args.seeds):
                out = str(Path(args.output_dir) / label / f"seed{seed}")
                metrics, seconds = run_arm(preset, [*args.set, *overrides], seed, out)
                if args.metric not in metrics:
                    known = ", ".join(sorted(metrics)) or "none (is data.test set?)"
                    print(f"error: run gave no {args.metric!r}; metrics: {known}", file=sys.stderr)
                    return 2
                results.setdefault(label, []).append(metrics[args.metric])
                raw.setdefault(label, []).append({"seed": seed, "seconds": seconds, **metrics})
                print(
                    f"[ab] {label} seed {seed}: {args.metric}={metrics[args.metric]:.4f} ({seconds:.0f}s)",
                    flush=True,
                )
    except (ConfigError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summaries = summarize(results, baseline)
    print(format_table(summaries, args.metric, baseline))
    if args.json:
        payload = {
            "metric": args.metric,
            "baseline": baseline,
            "runs": raw,
            "summary": [_as_dict(s) for s in summaries],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


def _as_dict(summary: ArmSummary) -> dict:
    out = dataclasses.asdict(summary)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


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
