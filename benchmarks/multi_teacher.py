"""Multi-teacher benchmark on the built-in tiny task (issue 14): two specialists, one student.

`low` (trained only on sums below 100) and `high` (only on sums of 100 or more) each teach
the weak 76 K-parameter student (configs/multi_teacher.yaml: on-policy GKD, forward KL,
300 steps of 32 prompts, lr 1e-3 cosine). Arms, with the same steps, seeds and prompts:

* route — both teachers, each training row routed to its specialist by its `teacher` field;
* confidence — both teachers, per token the one with the lower entropy weighs more (no field);
* low only / high only — one teacher, the same rows.

Accuracy is greedy exact match on the 200 shipped test sums (mixed halves), and on each half.

    python benchmarks/multi_teacher.py               # 4 arms, seed 0, 2 arms at a time
    python benchmarks/multi_teacher.py --smoke       # CI: 2 steps per arm, 16 test rows
    python benchmarks/multi_teacher.py --seed 1      # another seed of every arm
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
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="arms trained at once")
    parser.add_argument("--workdir", default="/tmp/protege-multi-teacher")
    args = parser.parse_args()
    steps, eval_size = (2, 16) if args.smoke else (args.steps, 200)
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [
            pool.submit(run_arm, name, steps, eval_size, args.seed, args.workdir) for name in ARMS
        ]
        runs = [future.result() for future in futures]
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
