"""Multi-teacher benchmark on the built-in tiny task (issue 14): two specialists, one student.

`low` (trained only on sums below 100) and `high` (only on sums of 100 or more) each teach
the weak 76 K-parameter student (configs/multi_teacher.yaml: on-policy GKD, forward KL,
300 steps of 32 prompts, lr 1e-3 cosine). Arms, with the same steps, seeds and prompts:

* route — both teachers, each training row routed to its specialist by its `teacher` field;
* confidence — both teachers, per token the one with the lower entropy weighs more (no field);
* learned — both teachers, per row α from a router on the student's prompt states, trained on
  the teachers' likelihood of the exact-match-rewarded responses (protege.router; the field
  is read only for the `router/agreement` diagnostic);
* low only / high only — one teacher, the same rows.

Accuracy is greedy exact match on the 200 shipped test sums (mixed halves), and on each half.

    python benchmarks/multi_teacher.py               # 4 arms, seed 0, 2 arms at a time
    python benchmarks/multi_teacher.py --smoke       # CI: 2 steps per arm, 16 test rows
    python benchmarks/multi_teacher.py --seed 1      # another seed of every arm
    python benchmarks/multi_teacher.py --arms learned  # only the arms whose name starts so;
                                                       # the other rows are kept from the file
Writes benchmarks/results/multi_teacher_seed<seed>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

LOW = {"name": "low", "model": "builtin:tiny/multi_teacher/low"}
HIGH = {"name": "high", "model": "builtin:tiny/multi_teacher/high"}
ARMS = {
    "route: low + high, by the row's teacher field": ([LOW, HIGH], "route"),
    "confidence: low + high, per token": ([LOW, HIGH], "confidence"),
    "learned: low + high, router trained on rewarded responses": ([LOW, HIGH], "learned"),
    "low only": ([LOW], "route"),
    "high only": ([HIGH], "route"),
}
COLUMNS = ("accuracy", "low_half", "high_half")


def run_arm(name: str, steps: int, eval_size: int, seed: int, workdir: str) -> dict:
    """Train one arm in this process; its accuracies before/after and wall seconds."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    from protege.config import CONFIG_DIR, load_config
    from protege.run import build_controller
    from protege.tasks.tiny import greedy_accuracy, load_rows, load_tokenizer, test_path

    torch.set_num_threads(1)
    teachers, mode = ARMS[name]
    tree = yaml.safe_load((CONFIG_DIR / "multi_teacher.yaml").read_text())
    tree["teachers"], tree["fusion"]["mode"] = teachers, mode
    out = Path(workdir) / name.split(":")[0].replace(" ", "_")
    out.mkdir(parents=True, exist_ok=True)
    (out / "preset.yaml").write_text(yaml.safe_dump(tree))
    config = load_config(
        out / "preset.yaml",
        [
            "trainer.workers=local",
            "logging.wandb=disabled",
            "logging.progress=false",
            "trainer.overwrite=true",
            f"trainer.steps={steps}",
            f"trainer.eval_size={eval_size}",
            f"trainer.seed={seed}",
            f"algorithm.seed={seed}",
            f"data.shuffle_seed={seed}",
            f"output_dir={out / 'run'}",
        ],
    )
    started = time.perf_counter()
    result = build_controller(config).run()
    seconds = time.perf_counter() - started
    router = router_summary(Path(config.output_dir) / "metrics.jsonl")
    rows = load_rows(test_path())[:eval_size]
    halves = {
        "low_half": [r for r in rows if int(r["answer"]) < 100],
        "high_half": [r for r in rows if int(r["answer"]) >= 100],
    }
    model = AutoModelForCausalLM.from_pretrained(f"{config.output_dir}/final")
    tokenizer = load_tokenizer()
    final = {half: greedy_accuracy(model, tokenizer, r) for half, r in halves.items()}
    return {
        "arm": name,
        "seed": seed,
        "before": result.get("eval_before/accuracy"),
        "accuracy": result["eval_after/accuracy"],
        **final,
        "seconds": round(seconds, 1),
        "test_rows": len(rows),
        **router,
    }


def router_summary(metrics: Path) -> dict:
    """fusion.mode=learned: the mean router/agreement over the first and the last 20 steps;
    empty for the other arms."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    agreement = [r["router/agreement"] for r in rows if "router/agreement" in r]
    if not agreement:
        return {}
    mean = lambda values: round(sum(values) / len(values), 3)
    return {"agreement_first": mean(agreement[:20]), "agreement_last": mean(agreement[-20:])}


def table(runs: list[dict], steps: int) -> str:
    first = runs[0]
    title = (
        f"# Multi-teacher benchmark (tiny task, {steps} steps x 32 prompts, seed {first['seed']})"
    )
    about = (
        f"Greedy exact match on the first {first['test_rows']} shipped test sums (mixed), and "
        "on the sums below 100 (low half) and of 100 or more (high half). Student before "
        f"training: {first['before']:.3f}."
    )
    lines = [
        title,
        "",
        about,
        "",
        "| arm | accuracy | low half | high half | wall s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        cells = " | ".join(f"{run[c]:.3f}" for c in COLUMNS)
        lines.append(f"| {run['arm']} | {cells} | {run['seconds']:.0f} |")
    for run in runs:
        if "agreement_first" in run:
            lines.append(
                f"\n{run['arm'].split(':')[0]}: router/agreement (argmax α = the row's teacher "
                f"field) {run['agreement_first']:.3f} over the first 20 steps -> "
                f"{run['agreement_last']:.3f} over the last 20."
            )
    return "\n".join(lines) + "\n"


def teacher_rows() -> list[str]:
    """The specialists' own numbers, from their build.json (scripts/build_tiny_assets.py)."""
    from protege.tasks.tiny import multi_teacher_path

    lines = ["", "| teacher | accuracy | low half | high half |", "| --- | --- | --- | --- |"]
    for half in ("low", "high"):
        built = json.loads((Path(multi_teacher_path(half)) / "build.json").read_text())
        lines.append(
            f"| {half} | {built['test_accuracy']:.3f} | {built['low_half_accuracy']:.3f} | "
            f"{built['high_half_accuracy']:.3f} |"
        )
    return lines


def kept_runs(path: Path, runs: list[dict], steps: int) -> list[dict]:
    """`runs` merged into the file's earlier runs of the same steps, in ARMS order."""
    earlier = json.loads(path.read_text()) if path.exists() else {"steps": steps, "runs": []}
    if earlier["steps"] != steps:
        return runs
    by_arm = {run["arm"]: run for run in earlier["runs"]} | {run["arm"]: run for run in runs}
    return [by_arm[name] for name in ARMS if name in by_arm]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="arms trained at once")
    parser.add_argument("--workdir", default="/tmp/protege-multi-teacher")
    parser.add_argument("--arms", nargs="*", help="arms whose name starts so (default: all)")
    args = parser.parse_args()
    steps, eval_size = (2, 16) if args.smoke else (args.steps, 200)
    chosen = [a for a in ARMS if not args.arms or any(a.startswith(p) for p in args.arms)]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [
            pool.submit(run_arm, name, steps, eval_size, args.seed, args.workdir) for name in chosen
        ]
        runs = [future.result() for future in futures]
    if args.arms and not args.smoke:
        runs = kept_runs(RESULTS / f"multi_teacher_seed{args.seed}.json", runs, steps)
    text = table(runs, steps) + "\n".join(teacher_rows()) + "\n"
    text += f"\nTotal wall time {(time.perf_counter() - started) / 60:.1f} min.\n"
    print(text)
    if args.smoke:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"multi_teacher_seed{args.seed}.md").write_text(text)
    (RESULTS / f"multi_teacher_seed{args.seed}.json").write_text(
        json.dumps({"steps": steps, "runs": runs}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
