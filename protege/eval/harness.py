"""One experiment harness: arms x seeds -> runs -> per-arm bootstrap CIs, paired tests against
a baseline arm, a Markdown table, a JSON file and a curve plot.

`python -m protege.eval.ab`, `benchmarks/quality.py` and `benchmarks/kv_ablation.py` differ
only in their arms and in `run_arm(arm, seed) -> ArmResult`; everything after the runs is here.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from protege.eval.stats import Interval, bootstrap_ci, paired_test


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...] = ()  # a.b=value config overrides of this arm
    notes: str = ""  # what the arm adds, for the table
    params: Mapping[str, Any] = field(default_factory=dict)  # caller-specific (preset, data, tree)

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> Arm:
        """Reads `asdict(arm)`, and flat dicts whose extra keys become params."""
        known = {"name", "overrides", "notes", "params"}
        params = {**saved.get("params", {}), **{k: v for k, v in saved.items() if k not in known}}
        return cls(saved["name"], tuple(saved.get("overrides", ())), saved.get("notes", ""), params)


@dataclass
class ArmResult:
    """One run of one arm with one seed."""

    seed: int
    final: dict[str, float]  # final metrics (the table's columns)
    correct: list[bool] | None = None  # per test example, for the per-example paired test
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, metric) as it trains
    seconds: float = 0.0  # wall time of the run
    extra: dict[str, Any] = field(default_factory=dict)  # kept in the JSON, not summarised

    def to_dict(self) -> dict[str, Any]:
        out = {"seed": self.seed, "seconds": self.seconds, "final": self.final}
        out.update(curve=[list(p) for p in self.curve], correct=self.correct)
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> ArmResult:
        known = {"seed", "seconds", "final", "curve", "correct"}
        curve = [(int(s), float(v)) for s, v in saved.get("curve") or []]
        extra = {k: v for k, v in saved.items() if k not in known}
        correct = saved.get("correct")
        return cls(
            int(saved["seed"]), dict(saved["final"]), correct, curve, saved["seconds"], extra
        )


@dataclass
class Results:
    arms: list[Arm]
    runs: dict[str, list[ArmResult]]  # arm name -> one result per seed, in seed order
    meta: dict[str, Any]  # machine, versions, wall_seconds, and whatever the caller adds

    def values(self, arm: str, metric: str) -> dict[int, float]:
        """seed -> final metric of `arm` (seeds whose run lacks the metric are left out)."""
        return {r.seed: r.final[metric] for r in self.runs[arm] if r.final.get(metric) is not None}


RunArm = Callable[[Arm, int], ArmResult]


def run_experiment(
    arms: Sequence[Arm],
    seeds: Sequence[int],
    run_arm: RunArm,
    previous: Results | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> Results:
    """Every arm with every seed, arm by arm. Runs found in `previous` (same arm name and seed)
    are reused, not rerun; its other arms are kept after these. Wall time adds up."""
    started = time.perf_counter()
    done = {(n, r.seed): r for n, runs in (previous.runs if previous else {}).items() for r in runs}
    runs: dict[str, list[ArmResult]] = {}
    for arm in arms:
        for seed in seeds:
            result = done.get((arm.name, seed))
            if result is None:
                result = run_arm(arm, seed)
                log(
                    f"[harness] {arm.name} seed {seed}: {_brief(result.final)} ({result.seconds:.1f}s)"
                )
            else:
                log(f"[harness] {arm.name} seed {seed}: reused from the previous results")
            runs.setdefault(arm.name, []).append(result)
    wall = time.perf_counter() - started
    all_arms = list(arms)
    if previous is not None:
        names = {a.name for a in arms}
        all_arms += [a for a in previous.arms if a.name not in names]
        runs.update({n: r for n, r in previous.runs.items() if n not in names})
        wall += previous.meta.get("wall_seconds", 0.0)
    return Results(all_arms, runs, {**machine_meta(), "wall_seconds": wall})


def _brief(final: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in list(final.items())[:3] if isinstance(v, float))


def machine_meta() -> dict[str, Any]:
    import torch

    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    metric: str
    difference: Interval  # mean over paired seeds of a − b, with its bootstrap interval
    p_seed: float  # exact sign-flip test over the paired seeds
    p_example: float | None  # sign-flip test over (seed, example) correctness, when both have it

    @property
    def verdict(self) -> str:
        """'yes' when the interval of a − b lies above 0, 'no' below 0, else 'tie'."""
        if self.difference.low > 0:
            return "yes"
        return "no" if self.difference.high < 0 else "tie"


def compare(
    results: Results, a: str, b: str, metric: str, level: float = 0.95
) -> Comparison | None:
    """Arm a against arm b, paired by seed (the seeds both ran); None when they share none."""
    va, vb = results.values(a, metric), results.values(b, metric)
    seeds = [s for s in va if s in vb]
    if not seeds:
        return None
    by_seed = paired_test([va[s] for s in seeds], [vb[s] for s in seeds], level)
    ca = {r.seed: r.correct for r in results.runs[a]}
    cb = {r.seed: r.correct for r in results.runs[b]}
    xs = [float(c) for s in seeds if ca[s] and cb[s] and len(ca[s]) == len(cb[s]) for c in ca[s]]
    ys = [float(c) for s in seeds if ca[s] and cb[s] and len(ca[s]) == len(cb[s]) for c in cb[s]]
    p_example = paired_test(xs, ys, level).p_value if xs else None
    return Comparison(a, b, metric, by_seed.difference, by_seed.p_value, p_example)


@dataclass(frozen=True)
class ArmSummary:
    name: str
    seeds: int
    metrics: dict[str, Interval]  # mean over seeds [bootstrap CI], per metric every run reports
    seconds: float  # mean wall seconds per run
    versus_baseline: Comparison | None = None  # on the primary metric


def summarise(
    results: Results, metrics: Sequence[str], baseline: str | None = None, level: float = 0.95
) -> list[ArmSummary]:
    """One summary per arm, in arm order; `metrics[0]` is the one compared with `baseline`."""
    if baseline is not None and baseline not in results.runs:
        raise ValueError(f"baseline arm {baseline!r} is not one of {', '.join(results.runs)}")
    summaries = []
    for arm in [a for a in results.arms if a.name in results.runs]:
        runs = results.runs[arm.name]
        intervals = {}
        for metric in metrics:
            values = list(results.values(arm.name, metric).values())
            if len(values) == len(runs):
                intervals[metric] = bootstrap_ci(values, level)
        versus = None
        if baseline is not None and arm.name != baseline and metrics[0] in intervals:
            versus = compare(results, arm.name, baseline, metrics[0], level)
        seconds = sum(r.seconds for r in runs) / len(runs)
        summaries.append(ArmSummary(arm.name, len(runs), intervals, seconds, versus))
    return summaries


def markdown_table(
    summaries: Sequence[ArmSummary],
    metrics: Sequence[str],
    baseline: str | None = None,
    labels: Mapping[str, str] | None = None,
    columns: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """arm | caller columns | metric mean [95% CI] ... | Δ vs baseline [CI] (first metric) | p
    (seeds) | p (examples) | seeds | wall s/run. `columns`: header -> arm name -> cell."""
    labels, columns = labels or {}, columns or {}
    with_examples = any(
        s.versus_baseline and s.versus_baseline.p_example is not None for s in summaries
    )
    header = ["arm", *columns, *(f"{labels.get(m, m)} [95% CI]" for m in metrics)]
    if baseline is not None:
        header += [f"Δ vs {baseline} [95% CI]", "p (seeds)"]  # on metrics[0]
        header += ["p (examples)"] if with_examples else []
    header += ["seeds", "wall s/run"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for s in summaries:
        cells = [s.name, *(col.get(s.name, "—") for col in columns.values())]
        cells += [str(s.metrics[m]) if m in s.metrics else "—" for m in metrics]
        if baseline is not None:
            v = s.versus_baseline
            cells += [signed(v.difference), f"{v.p_seed:.3f}"] if v else ["—", "—"]
            if with_examples:
                cells.append(format_p(v.p_example) if v and v.p_example is not None else "—")
        cells += [str(s.seeds), f"{s.seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def signed(interval: Interval) -> str:
    return f"{interval.mean:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}]"


def format_p(value: float) -> str:
    return "< 1e-4" if value == 0 else f"{value:.3g}"


def to_json(results: Results, summaries: Sequence[ArmSummary], **extra: Any) -> dict[str, Any]:
    """{meta (with the arms), summary, runs, **extra}: what `read_json` reads back."""
    meta = {**results.meta, "arms": [asdict(a) | {"params": dict(a.params)} for a in results.arms]}
    runs = {name: [r.to_dict() for r in runs] for name, runs in results.runs.items()}
    summary = [asdict(s) for s in summaries]
    return {"meta": meta, "summary": summary, **extra, "runs": runs}


def write_json(path: Path, results: Results, summaries: Sequence[ArmSummary], **extra: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(results, summaries, **extra), indent=1) + "\n")


def read_json(path: Path, convert: Callable[[dict], dict] | None = None) -> Results:
    """Results saved by `write_json`; `convert` maps an older run record to ArmResult's form."""
    saved = json.loads(Path(path).read_text())
    meta = {k: v for k, v in saved["meta"].items() if k != "arms"}
    arms = [Arm.from_dict(a) for a in saved["meta"].get("arms", [])]
    known = {a.name for a in arms}
    arms += [Arm(name) for name in saved["runs"] if name not in known]
    convert = convert or (lambda record: record)
    runs = {n: [ArmResult.from_dict(convert(r)) for r in rs] for n, rs in saved["runs"].items()}
    return Results(arms, runs, meta)


def plot_curves(results: Results, path: Path, ylabel: str, title: str) -> bool:
    """Each arm's curve, mean over seeds per step; False (nothing written) without matplotlib
    or without curves."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    curved = {n: runs for n, runs in results.runs.items() if runs and runs[0].curve}
    if not curved:
        return False
    fig, ax = plt.subplots(figsize=(10, 6))
    colours = plt.get_cmap("tab20")
    for i, (name, runs) in enumerate(curved.items()):
        steps = [s for s, _ in runs[0].curve]
        means = [sum(dict(r.curve).get(s, 0.0) for r in runs) / len(runs) for s in steps]
        style = "--" if i >= 10 else "-"
        ax.plot(
            steps,
            means,
            label=name,
            color=colours(i % 20),
            marker="o",
            markersize=3,
            linestyle=style,
        )
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
