"""The seed's control ladder for multi-teacher KV distillation, measured on the built-in task.

    python benchmarks/kv_ablation.py             # 11 arms x 3 seeds x 1000 steps (see below)
    python benchmarks/kv_ablation.py --smoke     # few steps, one seed, < 60 s
    python benchmarks/kv_ablation.py --seeds 5 --steps 600
    python benchmarks/kv_ablation.py --seeds 5 --arms two_router,single_b --merge   # add arms

Every arm trains the shipped student for the same steps, batch, LR and answer-CE weight δ;
arms differ only in what KV distillation adds, so "control" (δ·CE alone, no KV term) is the
baseline each arm is compared with, seed by seed (paired sign-flip test). Reported per arm:
greedy exact-match accuracy on the 200 held-out sums (the main evaluator; mean and 95%
bootstrap interval over seeds), the paired accuracy difference to the control, and wall time.
Writes benchmarks/results/kv_ablation.md and .json (or kv_ablation_smoke.* with --smoke).

Every arm is a main-pipeline run (`algorithm.name: kv_distill`, `trainer.workers=local`);
teachers cache their KV under <workdir>/teacher_kv/<teacher>, shared by all arms and seeds.
The committed table was measured with the old standalone KV trainer (see its header).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from protege.config import config_from_dict
from protege.eval.harness import (
    Arm,
    ArmResult,
    Results,
    markdown_table,
    read_json,
    run_experiment,
    summarise,
    to_json,
    write_json,
)
from protege.run import build_controller

RESULTS = Path(__file__).resolve().parent / "results"
TEACHER_A = {"name": "a", "model": "builtin:tiny/teacher"}
TEACHER_B = {"name": "b", "model": "builtin:tiny/teacher_b"}
BASIC = {"time_align": "resample", "projector": "linear", "train_projector": False}
BOTTLENECK = {"projector": "bottleneck", "train_projector": True}
TWO = [TEACHER_A, TEACHER_B]

# (arm, what it adds, teachers, kv_distill fields on top of the shared ones) — seed 004's
# ladder. Its "+task" rung is not here: the pipeline's kv_distill has no task-conditional
# fusion yet (see the notes).
_LADDER: list[tuple[str, str, list[dict], dict[str, Any]]] = [
    ("control", "no KV distillation (δ·CE only)", [TEACHER_A], {"distill": False}),
    (
        "single_basic",
        "teacher A, linear projector, proportional layers, uniform resampling",
        [TEACHER_A],
        BASIC,
    ),
    ("+bottleneck", "+ trained elastic-bottleneck projector", [TEACHER_A], {**BASIC, **BOTTLENECK}),
    (
        "+cka",
        "+ CKA top-2 layer map",
        [TEACHER_A],
        {**BASIC, **BOTTLENECK, "layer_map": "cka"},
    ),
    (
        "+segment",
        "+ segment-aware time alignment",
        [TEACHER_A],
        {**BASIC, **BOTTLENECK, "layer_map": "cka", "time_align": "segment"},
    ),
    (
        "two_attention",
        "teachers A+B, attention fusion (student queries over teacher keys)",
        TWO,
        {**BASIC, "time_align": "segment", "fusion": "attention"},
    ),
    (
        "everything",
        "A+B, bottleneck, CKA, segment, per-layer learnable router + entropy, attention KL γ=0.05",
        TWO,
        {
            **BASIC,
            **BOTTLENECK,
            "layer_map": "cka",
            "time_align": "segment",
            "fusion": "router",
            "per_layer_router": True,
            "gamma": 0.05,
        },
    ),
    # Seed 002 phase 4: fixed weights -> similarity routing -> learnable router (A+B, basic).
    ("two_fixed", "teachers A+B, fixed uniform weights", TWO, {**BASIC, "time_align": "segment"}),
    (
        "two_similarity",
        "teachers A+B, similarity routing (cosine to per-teacher KV prototypes)",
        TWO,
        {**BASIC, "time_align": "segment", "fusion": "similarity"},
    ),
    (
        "two_router",
        "teachers A+B, per-layer learnable router + entropy 0.01 (the example's preset)",
        TWO,
        {**BASIC, "time_align": "segment", "fusion": "router", "per_layer_router": True},
    ),
    # Not in the seed's ladder: the same-head-dim teacher alone, frozen identity-shaped projector.
    (
        "single_b",
        "teacher B alone (same head_dim as the student), basic alignment",
        [TEACHER_B],
        BASIC,
    ),
]
ARMS = [
    Arm(name, notes=what, params={"teachers": teachers, "algorithm": fields})
    for name, what, teachers, fields in _LADDER
]


def arm_config(
    arm: Arm, seed: int, steps: int, eval_size: int, output: Path, kv_dir: Path
) -> dict[str, Any]:
    """The main pipeline's config tree for one arm and seed: the example's preset settings
    (batch 32, lr 3e-3, δ = 0.1, shallow layers for the first 30% of steps), teachers that
    cache their KV under `kv_dir` (shared by every arm and seed: rows are keyed by content)."""
    teachers = [
        {**t, "kv_cache": True, "kv_cache_dir": str(kv_dir / t["name"])}
        for t in arm.params["teachers"]
    ]
    algorithm = {
        "name": "kv_distill",
        "fusion": "fixed",
        "delta": 0.1,
        "layer_warmup_steps": int(0.3 * steps),
        **arm.params["algorithm"],
    }
    return {
        "teachers": teachers,
        "algorithm": algorithm,
        "learner": {"lr": 3e-3},
        "data": {"shuffle_seed": seed},
        "trainer": {
            "steps": steps,
            "batch_size": 32,
            "seed": seed,
            "eval_size": eval_size,
            "workers": "local",
        },
        "logging": {"wandb": "disabled", "progress": False},
        "output_dir": str(output),
    }


def run_arm(arm: Arm, seed: int, steps: int, eval_size: int, workdir: Path) -> ArmResult:
    """One arm, one seed, through the main pipeline (`protege.run.build_controller`)."""
    config = arm_config(
        arm, seed, steps, eval_size, workdir / arm.name / str(seed), workdir / "teacher_kv"
    )
    torch.manual_seed(seed)
    start = time.perf_counter()
    train_seconds = 0.0

    def on_step(k: int, row: dict[str, float]) -> None:
        nonlocal train_seconds
        train_seconds += row.get("time/step", 0.0)

    result = build_controller(config_from_dict(config)).run(on_step)
    return ArmResult(
        seed,
        final={"accuracy": result["eval_after/accuracy"]},
        seconds=round(time.perf_counter() - start, 2),
        extra={
            "before": {"accuracy": result["eval_before/accuracy"]},
            "train_seconds": round(train_seconds, 2),
        },
    )


NOTES = [
    (
        "Notes. Every arm runs the main pipeline (`algorithm.name: kv_distill`, the controller, "
        "the learner actor, the main evaluator). The built-in task gives every model the same "
        "character tokens, so segment-aware time alignment is the identity here; it matters when "
        "a teacher reads a longer prompt (phase 1, `tests/test_kv_distill.py`). Seed 004's +task "
        "rung is not run: the pipeline's kv_distill has no task-conditional fusion yet. "
        "With n paired seeds the exact sign-flip p-value cannot go below 2/2^n. Wall time "
        "includes set-up and evaluation and depends on what else runs on the machine."
    ),
]


def markdown(results: Results) -> str:
    meta = results.meta
    summaries = summarise(results, ["accuracy"], baseline="control")
    labels = {"accuracy": "accuracy ↑"}
    adds = {"adds": {arm.name: arm.notes for arm in results.arms}}
    table = markdown_table(summaries, ["accuracy"], "control", labels, adds)
    intro = (
        f"{meta['seeds']} seed(s) × {meta['steps']} steps of batch 32, lr 3e-3, δ = 0.1 answer "
        f"CE in every arm; accuracy = greedy exact match on {meta['eval_size']} held-out sums; "
        "mean [95% bootstrap interval over seeds]; Δ vs control = paired accuracy difference "
        f"(sign-flip p-value). Student before training: accuracy 0.100. Measured {meta['date']} on {meta['machine']} in "
        f"{meta['total_minutes']:.1f} min."
    )
    lines = ["# KV-distillation ablation (built-in tiny task)", "", intro, "", table]
    return "\n".join([*lines, "", *NOTES]) + "\n"


def _select(names: str) -> list[Arm]:
    if not names:
        return ARMS
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = [arm.name for arm in ARMS]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {', '.join(known)}")
    return [arm for arm in ARMS if arm.name in wanted]


def _previous(path: Path, args: argparse.Namespace) -> Results | None:
    """Saved runs to merge with (same seeds, steps and eval size, or refuse)."""
    if not path.exists():
        return None
    previous = read_json(path, convert=_saved_run)
    meta = previous.meta
    if (meta["seeds"], meta["steps"], meta["eval_size"]) != (
        args.seeds,
        args.steps,
        args.eval_size,
    ):
        raise SystemExit(f"--merge: {path} has seeds/steps/eval_size {meta}; rerun with those")
    meta.setdefault("wall_seconds", 60 * meta["total_minutes"])  # files from before the harness
    return previous


def _saved_run(record: dict[str, Any]) -> dict[str, Any]:
    """A run record of a file written before the harness (flat accuracy/perplexity)."""
    if "final" in record:
        return record
    rest = {k: v for k, v in record.items() if k not in ("accuracy", "perplexity", "wall_seconds")}
    final = {"accuracy": record["accuracy"], "perplexity": record["perplexity"]}
    return {**rest, "final": final, "seconds": record["wall_seconds"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="few steps, one seed, small eval (< 60 s)"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--workdir", default="runs/kv_ablation")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--arms", default="", help="comma-separated subset of arms (default: all)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add to the saved results: keep their runs, run only the arm x seed they lack",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.eval_size = 1, 4, 16
    stem = "kv_ablation_smoke" if args.smoke else "kv_ablation"
    out = Path(args.out)
    previous = _previous(out / f"{stem}.json", args) if args.merge else None
    workdir = Path(args.workdir)
    results = run_experiment(
        _select(args.arms),
        range(args.seeds),
        lambda arm, seed: run_arm(arm, seed, args.steps, args.eval_size, workdir),
        previous,
    )
    results.arms = [arm for arm in ARMS if arm.name in results.runs]  # ladder order, notes
    results.meta.update(
        seeds=args.seeds,
        steps=args.steps,
        eval_size=args.eval_size,
        total_minutes=results.meta["wall_seconds"] / 60,
    )
    summaries = summarise(results, ["accuracy"], baseline="control")
    write_json(out / f"{stem}.json", results, summaries)
    (out / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    return to_json(results, summaries)


if __name__ == "__main__":
    main(sys.argv[1:])
