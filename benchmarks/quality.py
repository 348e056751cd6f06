"""Algorithm-comparison benchmark on the built-in tiny task (two-digit addition).

Setting: the 0.8 M-parameter teacher (~99% exact match); the weak 76 K-parameter student,
SFT'd on a small labelled set L (the first 300 rows of train.jsonl, the ones the shipped
student was trained on); a pool P of unlabelled prompts (all 2,000 train prompts, no
completions). Arms that train on dataset responses (SFT, supervised KD, GKD λ = 0.5) use
L; arms that only need prompts use P. The RL arm's exact-match reward is a verifier that
knows P's answers; MiniLLM's language-modelling term reads L's text only.

Every arm gets the same budget: 300 optimizer steps of 32 prompts, lr 1e-3 with cosine
decay (at constant lr the endpoint swings by ±0.2 between evaluations on this task), greedy
exact match on the 200 held-out test sums every 25 steps, and 4 samples per test prompt for
pass@4 / entropy / distinct-n.

    python benchmarks/quality.py               # full: 15 arms x 3 seeds (~30 min on 2 cores)
    python benchmarks/quality.py --controls    # diagnostic arms (data split, lr schedule)
    python benchmarks/quality.py --smoke       # CI: 4 arms, 4 steps, one seed
    python benchmarks/quality.py --render benchmarks/results/quality.json   # redraw only
Writes benchmarks/results/quality{,_controls}.md, .json and _curve.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protege.eval.ab import seed_overrides
from protege.eval.harness import (
    Arm,
    ArmResult,
    Results,
    compare,
    format_p,
    markdown_table,
    plot_curves,
    read_json,
    run_experiment,
    summarise,
    write_json,
)

RESULTS = ROOT / "benchmarks" / "results"
LABELLED_ROWS = 300


def arm(
    name: str,
    data: str,
    overrides: tuple[str, ...],
    pretrain: bool = False,
    notes: str = "",
    control: bool = False,
) -> Arm:
    """data: "labelled" (L, with completions), "pool" (P, prompts only) or "gold" (all 2,000
    labelled); pretrain: MiniLLM's LM term on L's text; control: a diagnostic arm (--controls)."""
    return Arm(name, overrides, notes, {"data": data, "pretrain": pretrain, "control": control})


def gkd(lmbda: float, beta: float, **extra: object) -> tuple[str, ...]:
    return (
        "algorithm.name=gkd",
        f"algorithm.lmbda={lmbda}",
        f"algorithm.beta={beta}",
        *(f"algorithm.{k}={v}" for k, v in extra.items()),
    )


ARMS: list[Arm] = [
    arm("SFT on L", "labelled", ("algorithm.name=sft",)),
    arm("supervised KD (GKD λ=0, β=0)", "labelled", gkd(0.0, 0.0)),
    arm("SeqKD (teacher-written, fwd KL)", "pool", gkd(0.0, 0.0, seq_kd="true")),
    *[arm(f"GKD λ=0.5, β={b}", "labelled", gkd(0.5, b)) for b in (0.0, 0.5, 1.0)],
    *[arm(f"GKD λ=1, β={b}", "pool", gkd(1.0, b)) for b in (0.0, 0.5, 1.0)],
    arm(
        "MiniLLM (mix α=0.2)",
        "pool",
        ("algorithm.name=minillm", "algorithm.mix_alpha=0.2", "algorithm.lm_coef=0.5"),
        True,
    ),
    arm(
        "MiniLLM (no mix)",
        "pool",
        ("algorithm.name=minillm", "algorithm.mix_alpha=0.0", "algorithm.lm_coef=0.5"),
        True,
    ),
    arm(
        "gated dual-KL (hard)",
        "pool",
        ("algorithm.name=gated_dual_kl", "algorithm.gate=hard", "algorithm.tau=1.0"),
    ),
    arm(
        "gated dual-KL (soft)",
        "pool",
        ("algorithm.name=gated_dual_kl", "algorithm.gate=soft", "algorithm.tau=1.0"),
    ),
    arm(
        "TAID (on-policy, t 0.4→1 adaptive)",
        "pool",
        ("algorithm.name=taid", "algorithm.total_steps=300"),
        notes="interpolated target from the detached student to the teacher (Shing et al. 2025)",
    ),
    arm(
        "DistiLLM skew RKL α=0.1 (λ=1)",
        "pool",
        ("algorithm.name=distillm", "algorithm.divergence=skew_reverse", "algorithm.lmbda=1.0"),
    ),
    arm(
        "DistiLLM skew FKL α=0.1 (λ=1)",
        "pool",
        ("algorithm.name=distillm", "algorithm.divergence=skew_forward", "algorithm.lmbda=1.0"),
    ),
    arm("OPD", "pool", ("algorithm.name=opd",)),
    arm(
        "RL+distill (α=0.5, EM reward, 4 samples)",
        "pool",
        (
            "algorithm.name=rl_distill",
            "algorithm.alpha=0.5",
            "algorithm.samples_per_prompt=4",
            "reward.rules=[{name: exact_match}]",
        ),
        notes="4 samples per prompt",
    ),
]
CONSTANT_LR = "learner.lr_schedule=constant"
ARMS += [  # diagnostics: what the data split and the lr schedule do (python quality.py --controls)
    arm("control: GKD λ=1, β=0.5 on L", "labelled", gkd(1.0, 0.5), control=True),
    arm("control: supervised KD on gold 2,000", "gold", gkd(0.0, 0.0), control=True),
    arm("control: GKD λ=0.5, β=0.5 on gold 2,000", "gold", gkd(0.5, 0.5), control=True),
    arm(
        "control: GKD λ=0.5, β=0.5 on gold 2,000, constant lr",
        "gold",
        (*gkd(0.5, 0.5), CONSTANT_LR),
        control=True,
    ),
    arm(
        "control: GKD λ=1, β=0.5 on P, constant lr",
        "pool",
        (*gkd(1.0, 0.5), CONSTANT_LR),
        control=True,
    ),
]
DATA_NAMES = {"labelled": "L (300 labelled)", "pool": "P (2,000 prompts)", "gold": "2,000 labelled"}
SMOKE_ARMS = ("SFT on L", "supervised KD (GKD λ=0, β=0)", "GKD λ=1, β=0.5", "MiniLLM (mix α=0.2)")


@dataclass
class Budget:
    steps: int = 300
    batch: int = 32
    eval_every: int = 25
    eval_size: int = 200
    eval_samples: int = 4
    seeds: int = 3
    lr: float = 1e-3
    extra: list[str] = field(default_factory=list)


def write_data(workdir: Path) -> dict[str, str]:
    """L (labelled rows), P (unlabelled prompts, answers kept for the RL verifier) and L's
    text for MiniLLM's LM term, all cut from the shipped train.jsonl."""
    from protege.tasks.tiny import load_rows, train_path

    rows = load_rows(train_path())
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {
        "labelled": workdir / "labelled.jsonl",
        "pool": workdir / "pool.jsonl",
        "text": workdir / "labelled.txt",
    }
    labelled = rows[:LABELLED_ROWS]
    paths["labelled"].write_text("".join(json.dumps(r) + "\n" for r in labelled))
    paths["pool"].write_text(
        "".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows)
    )
    paths["text"].write_text("".join(r["prompt"] + r["answer"] + "\n" for r in labelled))
    return {**{k: str(v) for k, v in paths.items()}, "gold": train_path()}


def arm_overrides(arm: Arm, data: dict[str, str], budget: Budget, output_dir: Path) -> list[str]:
    pretrain = data["text"] if arm.params["pretrain"] else "null"
    common = [
        "trainer.workers=local",
        "logging.wandb=disabled",
        "logging.progress=false",
        f"trainer.steps={budget.steps}",
        f"trainer.batch_size={budget.batch}",
        f"trainer.eval_every={budget.eval_every}",
        f"trainer.eval_size={budget.eval_size}",
        f"trainer.eval_samples={budget.eval_samples}",
        f"learner.lr={budget.lr}",
        "learner.lr_schedule=cosine",
        "rollout.max_new_tokens=6",
        "data.test=builtin:tiny/test",
        f"data.train={data[arm.params['data']]}",
        f"data.pretrain={pretrain}",
        f"output_dir={output_dir}",
    ]
    return [*common, *arm.overrides, *budget.extra]


def run_one(arm: Arm, seed: int, data: dict[str, str], budget: Budget, workdir: Path) -> ArmResult:
    from protege.config import load_config
    from protege.run import build_controller

    output_dir = workdir / "runs" / slug(arm.name) / f"seed{seed}"
    overrides = arm_overrides(arm, data, budget, output_dir)
    name = load_config(None, overrides).algorithm["name"]
    # a rerun replaces the arm's old run (metrics.jsonl, checkpoints) instead of being refused
    config = load_config(None, [*overrides, *seed_overrides(name, seed), "trainer.overwrite=true"])
    started = time.perf_counter()
    controller = build_controller(config)
    result = controller.run()
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").open()]
    curve = sorted(
        {_curve_step(r, budget.steps): _acc(r) for r in rows if _acc(r) is not None}.items()
    )
    return ArmResult(
        seed,
        final={k.split("/", 1)[1]: v for k, v in result.items() if k.startswith("eval_after/")},
        correct=[bool(c) for c in controller.evaluator.last_correct],
        curve=curve,
        seconds=seconds,
        extra={
            "before": {
                k.split("/", 1)[1]: v for k, v in result.items() if k.startswith("eval_before/")
            }
        },
    )


def _curve_step(row: dict, steps: int) -> int:
    """Steps trained when the row's evaluation ran (eval_after repeats the last eval)."""
    if "eval_before/accuracy" in row:
        return 0
    return steps if "eval_after/accuracy" in row else row["step"] + 1


def _acc(row: dict) -> float | None:
    for key in ("eval_before/accuracy", "eval/accuracy", "eval_after/accuracy"):
        if key in row:
            return row[key]
    return None


def slug(name: str) -> str:
    keep = "".join(c if c.isalnum() else "_" for c in name.lower())
    return "_".join(part for part in keep.split("_") if part)[:60]


METRICS = ("accuracy", "pass_at_4", "entropy", "sample_distinct_2")
LABELS = {"pass_at_4": "pass@4", "sample_distinct_2": "distinct-2"}


def comparisons(results: Results) -> list[dict]:
    """The orderings the papers predict, each as a paired test: by seed (the i-th run of
    both arms shares the seed) and by (seed, test example) correctness."""
    on_policy = [n for n in results.runs if n.startswith("GKD λ=1")]
    best_on_policy = max(on_policy, key=lambda n: _final_mean(results, n), default=None)
    claims = [
        ("GKD: on-policy ≥ supervised KD", best_on_policy, "supervised KD (GKD λ=0, β=0)"),
        ("GKD: supervised KD ≥ SFT", "supervised KD (GKD λ=0, β=0)", "SFT on L"),
        (
            "on-policy ≥ SeqKD on the same prompts P",
            best_on_policy,
            "SeqKD (teacher-written, fwd KL)",
        ),
        ("MiniLLM ≥ SeqKD", "MiniLLM (mix α=0.2)", "SeqKD (teacher-written, fwd KL)"),
        ("MiniLLM (no mix) ≥ SeqKD", "MiniLLM (no mix)", "SeqKD (teacher-written, fwd KL)"),
    ]
    out = []
    for claim, a, b in claims:
        if a not in results.runs or b not in results.runs:
            continue
        c = compare(results, a, b, "accuracy")
        d = c.difference
        out.append(
            {
                "claim": claim,
                "a": a,
                "b": b,
                "difference": [d.mean, d.low, d.high],
                "p_seed": c.p_seed,
                "p_example": c.p_example,
                "holds": c.verdict,
            }
        )
    return out


def _final_mean(results: Results, name: str) -> float:
    values = results.values(name, "accuracy").values()
    return sum(values) / len(values)


def markdown(results: Results, claims: list[dict], curve_name: str) -> str:
    meta = results.meta
    before = next(iter(results.runs.values()))[0].extra["before"]
    budget = meta["budget"]
    # files written before the harness name the wall time total_seconds
    wall = meta["wall_seconds"] if "wall_seconds" in meta else meta["total_seconds"]
    intro = (
        f"{budget['steps']} steps x {budget['batch']} prompts per arm, {budget['seeds']} seed(s), "
        f"lr {budget['lr']} with cosine decay; accuracy = greedy exact match on {budget['eval_size']} "
        "held-out sums (mean over seeds [95% bootstrap CI]); pass@4, entropy (nats/token) and "
        "distinct-2 from 4 samples per test prompt at temperature 1. Student before training: "
        f"accuracy {before['accuracy']:.3f}. Wall time per run on {meta['machine']} ({meta['note']})."
    )
    data = {"data": {a.name: DATA_NAMES[a.params["data"]] for a in results.arms}}
    table = markdown_table(summarise(results, METRICS), METRICS, labels=LABELS, columns=data)
    lines = ["# Quality benchmark (tiny task)", "", intro, "", table]
    if claims:
        lines += [
            "",
            CLAIMS_NOTE,
            "",
            "| claim | A − B [95% CI] | p (seeds) | p (examples) | holds |",
            "| --- | --- | --- | --- | --- |",
        ]
    for c in claims:
        d = c["difference"]
        lines.append(
            f"| {c['claim']} ({c['a']} vs {c['b']}) | {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] | "
            f"{c['p_seed']:.3f} | {format_p(c['p_example'])} | {c['holds']} |"
        )
    lines += ["", f"Total wall time {wall / 60:.1f} min. Curves: {curve_name}.", ""]
    return "\n".join(lines)


CLAIMS_NOTE = (
    "Expected orderings. A − B: mean over seeds of the paired difference in accuracy, with its "
    "bootstrap interval; p (seeds): exact sign-flip test over the seeds (with 3 seeds it cannot go "
    "below 0.25); p (examples): sign-flip test over (seed, test example) pairs of correctness "
    "(10,000 random flips). holds: yes when the interval is above 0, no when below, tie otherwise."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="CI: 4 arms, 4 steps, 1 seed, 32 test prompts"
    )
    parser.add_argument("--controls", action="store_true", help="run the diagnostic arms only")
    parser.add_argument(
        "--render", help="rewrite the .md and .png from this saved .json, run nothing"
    )
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--arms", nargs="*", help="run only arms whose name contains one of these")
    parser.add_argument("--out", default=str(RESULTS), help="where quality.md/json/png go")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the runs already in the output JSON; run the rest",
    )
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "quality"))
    parser.add_argument(
        "--note", default="2 CPU cores shared with other jobs: wall times are inflated"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="a.b=value", help="extra overrides for every arm"
    )
    args = parser.parse_args(argv)
    if args.render:
        return render(Path(args.render))
    budget = (
        Budget(steps=4, batch=8, eval_every=2, eval_size=32, eval_samples=4, seeds=1)
        if args.smoke
        else Budget()
    )
    budget.steps = args.steps or budget.steps
    budget.seeds = args.seeds or budget.seeds
    budget.extra = list(args.set)
    arms = [a for a in ARMS if a.params["control"] == args.controls]
    arms = [a for a in arms if not args.arms or any(key in a.name for key in args.arms)]
    if args.smoke and not args.arms:
        arms = [a for a in ARMS if a.name in SMOKE_ARMS]
    workdir, out = Path(args.workdir), Path(args.out)
    data = write_data(workdir / "data")
    stem = "quality_smoke" if args.smoke else "quality_controls" if args.controls else "quality"
    previous = (
        read_json(out / f"{stem}.json") if args.merge and (out / f"{stem}.json").exists() else None
    )
    results = run_experiment(
        arms,
        range(budget.seeds),
        lambda arm, seed: run_one(arm, seed, data, budget, workdir),
        previous=previous,
    )
    results.meta.update(budget=budget.__dict__, note=args.note)
    print(write_report(out / f"{stem}.json", results))
    return 0


def write_report(json_path: Path, results: Results, rewrite_json: bool = True) -> str:
    """The .json (unless only redrawing), the .md and the _curve.png next to each other."""
    claims = comparisons(results)
    if rewrite_json:
        write_json(json_path, results, summarise(results, METRICS), claims=claims)
    curve = json_path.with_name(json_path.stem + "_curve.png")
    table = markdown(results, claims, curve_name=curve.name)
    json_path.with_suffix(".md").write_text(table)
    plot_curves(results, curve, "greedy exact match (mean over seeds)", TITLE)
    return table


TITLE = "tiny task: student accuracy vs step"


def render(json_path: Path) -> int:
    print(write_report(json_path, read_json(json_path), rewrite_json=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
