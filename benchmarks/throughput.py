"""Throughput of one on-policy GKD job (λ = 1, β = 0.5): protege vs TRL's GKDTrainer.

The same tiny teacher/student (the built-in task), prompts, batch size, max_new_tokens,
learning rate, optimizer (AdamW), gradient clipping and loss (generalized JSD over the full
teacher distribution) run with

* protege, synchronous (`trainer.max_staleness=0`) and pipelined (`=1`), with 1 and 2
  rollout workers, over Ray actors, and in-process (pipelined: each worker on its own thread);
* TRL 1.x `trl.experimental.gkd.GKDTrainer`, in one process, with 1 and with 2 torch threads.

Every process uses one torch thread (OMP_NUM_THREADS=1) unless stated; every run shares the
same machine's cores (the script records how many). Steps/s is the steady state: wall time
between the ends of the measured steps, after warm-up steps. Repeats are interleaved and the
median run is reported, because timings on a shared machine are noisy.

    python benchmarks/throughput.py            # full table -> benchmarks/results/throughput.{md,json}
    python benchmarks/throughput.py --smoke    # a few steps of everything (the test runs this)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fresh_process import clean_env, report, run_fresh

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # protege from this checkout

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = (
    "time/rollout",
    "time/teacher",
    "time/reward",
    "time/learner",
    "time/sync",
    "time/wait_rollout",
    "time/wait_learner",
    "time/model",
    "time/overhead",
    "time/overhead_fraction",
)


def protege_configs(smoke: bool) -> list[dict]:
    configs = [
        {
            "name": "protege in-process sync",
            "workers": "local",
            "staleness": 0,
            "rollout_workers": 1,
        },
        {
            "name": "protege in-process sync (2 torch threads)",
            "workers": "local",
            "staleness": 0,
            "rollout_workers": 1,
            "torch_threads": 2,
        },
        {
            "name": "protege in-process pipelined (threads)",
            "workers": "local",
            "staleness": 1,
            "rollout_workers": 1,
        },
        {
            "name": "protege ray sync, 1 rollout worker",
            "workers": "ray",
            "staleness": 0,
            "rollout_workers": 1,
        },
        {
            "name": "protege ray pipelined, 1 rollout worker",
            "workers": "ray",
            "staleness": 1,
            "rollout_workers": 1,
        },
        {
            "name": "protege ray sync, 2 rollout workers",
            "workers": "ray",
            "staleness": 0,
            "rollout_workers": 2,
        },
        {
            "name": "protege ray pipelined, 2 rollout workers",
            "workers": "ray",
            "staleness": 1,
            "rollout_workers": 2,
        },
    ]
    if smoke:  # one Ray configuration keeps the smoke test under a minute
        configs = [configs[0], configs[4]]
    return configs


def run_protege(spec: dict, args: argparse.Namespace, out: Path) -> dict:
    from protege.config import load_config
    from protege.run import build_controller

    torch.set_num_threads(spec.get("torch_threads", 1))  # intra-op threads of this process
    steps = args.warmup + args.steps
    config = load_config(
        "gkd",
        [
            f"trainer.workers={spec['workers']}",
            f"trainer.max_staleness={spec['staleness']}",
            f"rollout.num_workers={spec['rollout_workers']}",
            f"trainer.steps={steps}",
            f"trainer.batch_size={args.batch_size}",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            "algorithm.lmbda=1.0",
            "algorithm.beta=0.5",
            "algorithm.teacher_output=full",  # TRL's GKDTrainer uses the full teacher logits too
            "learner.lr=1e-3",
            "data.test=null",
            "logging.wandb=disabled",
            "logging.progress=false",
            f"output_dir={out}",
        ],
    )
    ends, cpu, rows = [], [], []

    def on_step(k: int, row: dict[str, float]) -> None:
        ends.append(time.perf_counter())
        cpu.append(time.process_time())
        rows.append(row)

    build_controller(config).run(on_step=on_step)
    measured = rows[args.warmup :]
    seconds_per_step = (ends[-1] - ends[args.warmup - 1]) / args.steps
    tokens = statistics.mean(row["rollout/tokens"] for row in measured)
    in_process = spec["workers"] == "local"  # Ray actors' CPU time is in other processes
    return {
        "steps_per_s": 1.0 / seconds_per_step,
        "tokens_per_s": tokens / seconds_per_step,
        "tokens_per_step": tokens,
        "cpu_ms_per_step": 1000 * (cpu[-1] - cpu[args.warmup - 1]) / args.steps
        if in_process
        else None,
        "phases": {key: statistics.median(row.get(key, 0.0) for row in measured) for key in PHASES},
        "final_loss": statistics.mean(row["learner/loss"] for row in measured[-5:]),
        "max_staleness_seen": max(row["rollout/staleness"] for row in rows),
    }


def run_trl(threads: int, args: argparse.Namespace, out: Path) -> dict:
    """TRL's GKDTrainer on the same job; its own loop, timed between optimizer steps."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from protege.data import read_jsonl
    from protege.modeling import load_model, load_tokenizer

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer("builtin:tiny/student")
    rows = read_jsonl("builtin:tiny/train")
    student, teacher = load_model("builtin:tiny/student"), load_model("builtin:tiny/teacher")
    student.config.use_cache = True  # GKDTrainer generates with the KV cache
    dataset = Dataset.from_list([{"prompt": r.prompt, "completion": r.completion} for r in rows])

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        """TRL's ChatML collator's output for plain-text rows (the tiny tokenizer has no
        chat template): left-padded prompts, prompt+completion, completion labels."""
        prompts = tokenizer([e["prompt"] for e in examples], return_tensors="pt", padding=True)
        full = tokenizer(
            [e["prompt"] + e["completion"] for e in examples], return_tensors="pt", padding=True
        )
        labels = full["input_ids"].masked_fill(full["attention_mask"] == 0, -100)
        width = full["input_ids"].shape[1]
        for i in range(len(examples)):
            pad = width - int(full["attention_mask"][i].sum())
            labels[i, : pad + int(prompts["attention_mask"][i].sum())] = -100
        return {
            "prompts": prompts["input_ids"],
            "prompt_attention_mask": prompts["attention_mask"],
            "input_ids": full["input_ids"],
            "attention_mask": full["attention_mask"],
            "labels": labels,
        }

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.cpu: list[float] = []

        def on_step_end(self, *_, **__) -> None:
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

    clock = StepClock()
    config = GKDConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        lmbda=1.0,
        beta=0.5,
        temperature=1.0,
        max_new_tokens=args.max_new_tokens,
        gradient_checkpointing=False,  # protege does not checkpoint either (and TRL's default breaks generation here)
        bf16=False,
        use_cpu=True,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=collate,
        callbacks=[clock],
    )
    generated, phase = [], {"generate": [], "forward": []}
    generate, compute_loss = trainer.generate_on_policy_outputs, trainer.compute_loss

    def timed_generate(model, inputs, generation_config):
        started = time.perf_counter()
        ids, mask, labels = generate(model, inputs, generation_config)
        phase["generate"].append(time.perf_counter() - started)
        generated.append(int((labels != -100).sum()))
        return ids, mask, labels

    def timed_loss(*a, **kw):
        started = time.perf_counter()
        result = compute_loss(*a, **kw)
        phase["forward"].append(time.perf_counter() - started)
        return result

    trainer.generate_on_policy_outputs, trainer.compute_loss = timed_generate, timed_loss
    try:
        trainer.train()
    finally:
        torch.set_num_threads(previous_threads)
    ends = clock.ends
    seconds_per_step = (ends[-1] - ends[args.warmup - 1]) / args.steps
    tokens = statistics.mean(generated[args.warmup :])
    gen = statistics.median(phase["generate"][args.warmup :])
    fwd = statistics.median(phase["forward"][args.warmup :])
    return {
        "steps_per_s": 1.0 / seconds_per_step,
        "tokens_per_s": tokens / seconds_per_step,
        "tokens_per_step": tokens,
        "cpu_ms_per_step": 1000 * (clock.cpu[-1] - clock.cpu[args.warmup - 1]) / args.steps,
        "phases": {
            "generate": gen,
            "teacher+student forward": fwd,
            "backward+optimizer+trainer": max(seconds_per_step - gen - fwd, 0.0),
        },
    }


def teacher_payload(args: argparse.Namespace) -> list[dict]:
    """Bytes per response token that teacher scoring ships (tensor bytes and pickled wire
    bytes), and the GKD loss (JSD β=0.5) error of top-k+tail against the full distribution."""
    from protege.actors.sampler import HFSampler
    from protege.actors.teacher import TeacherScorer, payload_bytes
    from protege.algorithms.gkd import GKD
    from protege.config import RolloutConfig
    from protege.data import PromptSource, read_jsonl
    from protege.modeling import load_model, load_tokenizer, response_logits
    from protege.records import RolloutPlan
    from protege.student import StudentLogits

    tokenizer = load_tokenizer("builtin:tiny/student")
    prompts = PromptSource(read_jsonl("builtin:tiny/train"), tokenizer, batch_size=64).next(step=0)
    sampler = HFSampler(
        "builtin:tiny/student", RolloutConfig(max_new_tokens=args.max_new_tokens), seed=0
    )
    batch = sampler.generate(prompts, RolloutPlan(teacher_need="none"))
    teacher = TeacherScorer("builtin:tiny/teacher")
    with torch.no_grad():
        student_logits = response_logits(load_model("builtin:tiny/student"), batch).float()
    tokens = batch.num_response_tokens
    bare = len(pickle.dumps(batch, protocol=5))
    modes = [("sampled", 0), ("full", 0)] + [("topk", k) for k in (1, 4, 8, 16)]
    results, full_loss = [], None
    for need, k in modes:
        scored = teacher.score(batch, RolloutPlan(teacher_need=need, topk=k))
        row = {
            "mode": need if need != "topk" else f"top-{k} + tail",
            "tensor_bytes_per_token": payload_bytes(scored) / tokens,
            "wire_bytes_per_token": (len(pickle.dumps(scored, protocol=5)) - bare) / tokens,
        }
        if need != "sampled":
            loss = float(GKD(beta=0.5).loss(StudentLogits(student_logits), scored)[0])
            full_loss = loss if need == "full" else full_loss
            row["jsd"] = loss
            row["relative_error_vs_full"] = abs(loss - full_loss) / full_loss
        results.append(row)
    return results


def fmt(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}f}"


def write_results(results: dict, directory: Path, name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (directory / f"{name}.md").write_text(markdown(results))


def markdown(results: dict) -> str:
    setup = results["setup"]
    trl_best = _best_trl(results["runs"])
    lines = [
        "# Throughput: protege vs TRL GKDTrainer (on-policy GKD, λ=1, β=0.5)",
        "",
        (
            f"Job: built-in tiny task, batch {setup['batch_size']} prompts, max_new_tokens "
            f"{setup['max_new_tokens']}, AdamW lr 1e-3, grad clip 1.0, full-vocabulary JSD. "
            f"{setup['warmup']} warm-up + {setup['steps']} measured steps per run, median of "
            f"{setup['repeats']} interleaved repeats, each run in a fresh process. Machine: {setup['cpus']} CPU cores shared by "
            f"every process of a run (and by other jobs: load average {setup['load_average']}); "
            "1 torch thread per process unless stated."
        ),
        "",
        "| run | steps/s | tokens/s | vs best TRL | CPU ms/step |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, run in results["runs"].items():
        ratio = f"{run['steps_per_s'] / trl_best:.2f}×" if trl_best else "–"
        cpu = run.get("cpu_ms_per_step")  # in-process runs only: Ray actors are other processes
        cpu_cell = fmt(cpu) if cpu is not None else "–"
        speed = f"{fmt(run['steps_per_s'])} | {fmt(run['tokens_per_s'], 0)}"
        lines.append(f"| {name} | {speed} | {ratio} | {cpu_cell} |")
    lines += [
        "",
        (
            "steps/s: steady state (wall time between step ends). CPU ms/step: CPU time of the run's"
            " process per step (all its threads), for in-process runs only — a measure of the work"
            " per step that the machine's other load does not change much."
        ),
        "",
        (
            "Phase breakdown (median ms per step). protege phases are worker-side seconds (they include"
            " time a worker waited for a core or the GIL); `wait_*` is the driver blocked on results;"
            " `model` is the critical path of the model work (rollout+teacher+learner when synchronous,"
            " the longer of the rollout and learner lanes when pipelined); `overhead` = step − model."
        ),
        "",
    ]
    lines += ["| run | " + " | ".join(k.removeprefix("time/") for k in PHASES) + " |"]
    lines += ["| --- |" + " ---: |" * len(PHASES)]
    for name, run in results["runs"].items():
        if name.startswith("TRL"):
            continue
        cells = [
            f"{100 * run['phases'][k]:.0f}%"
            if k.endswith("fraction")
            else fmt(1000 * run["phases"][k])
            for k in PHASES
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, run in results["runs"].items():
        if name.startswith("TRL"):
            parts = ", ".join(f"{k} {fmt(1000 * v)} ms" for k, v in run["phases"].items())
            lines.append(f"\n{name}: {parts}.")
    lines += [
        "",
        "Teacher payload per response token (tiny vocabulary V = 30; ids are int64):",
        "",
        "| mode | tensor bytes/token | pickled bytes/token | JSD(β=0.5) | rel. error vs full |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in results["teacher_payload"]:
        jsd = f"{row['jsd']:.4f}" if "jsd" in row else "–"
        error = f"{row['relative_error_vs_full']:.2%}" if "relative_error_vs_full" in row else "–"
        lines.append(
            f"| {row['mode']} | {fmt(row['tensor_bytes_per_token'])} | "
            f"{fmt(row['wire_bytes_per_token'])} | {jsd} | {error} |"
        )
    return "\n".join(lines) + "\n"


def run_names(args: argparse.Namespace) -> list[str]:
    names = (
        []
        if args.no_trl
        else [f"TRL GKDTrainer ({t} torch thread{'s' if t > 1 else ''})" for t in args.trl_threads]
    )
    return names + [spec["name"] for spec in protege_configs(args.smoke)]


def run_one(name: str, args: argparse.Namespace) -> dict:
    """One run in this (fresh) process."""
    out = Path(tempfile.mkdtemp(prefix="protege-bench-"))
    try:
        if name.startswith("TRL"):
            return run_trl(int(name.split("(")[1].split()[0]), args, out)
        spec = next(spec for spec in protege_configs(args.smoke) if spec["name"] == name)
        return run_protege(spec, args, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_isolated(name: str, args: argparse.Namespace) -> dict:
    """`name` in a fresh Python process: no run inherits another's state (a torch.distributed
    group left by protege's learner made accelerate wrap TRL's model in DDP), and each Ray
    run starts its own local Ray instance."""
    command = [sys.executable, __file__, "--run", name, *_forwarded(args)]
    return run_fresh(name, command, clean_env(RAY_ADDRESS="local"), timeout=1200)


def _forwarded(args: argparse.Namespace) -> list[str]:
    out = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--batch-size={args.batch_size}"]
    out += [f"--max-new-tokens={args.max_new_tokens}"]
    return out + (["--smoke"] if args.smoke else [])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument(
        "--smoke", action="store_true", help="a few steps of each run (for the test)"
    )
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument(
        "--trl-threads", type=lambda text: [int(t) for t in text.split(",")], default=[1, 2]
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where throughput.{md,json} go"
    )
    parser.add_argument(
        "--name",
        help="result file name without suffix (default throughput, throughput_no_trl with --no-trl)",
    )
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one run, in this process
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.repeats = 3, 2, 1
        args.trl_threads = [1]
    torch.set_num_threads(1)
    if args.run:
        report(run_one(args.run, args))
        return {"run": args.run}
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):  # interleaved: slow phases of a shared machine hit every run
        for name in run_names(args):
            runs.setdefault(name, []).append(run_isolated(name, args))
            print(f"{name}: {runs[name][-1]['steps_per_s']:.1f} steps/s", flush=True)
    median_runs = {name: _median_run(reps) for name, reps in runs.items()}
    results = {
        "setup": {
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "smoke": args.smoke,
        },
        "runs": median_runs,
        "all_repeats_steps_per_s": {
            name: [r["steps_per_s"] for r in reps] for name, reps in runs.items()
        },
        "teacher_payload": teacher_payload(args),
    }
    trl_best = _best_trl(median_runs)
    if trl_best:
        results["ratio_vs_best_trl"] = {
            n: r["steps_per_s"] / trl_best for n, r in median_runs.items()
        }
    name = args.name or ("throughput_no_trl" if args.no_trl else "throughput")
    write_results(results, args.results, name)
    print(markdown(results))
    return results


def _best_trl(runs: dict[str, dict]) -> float | None:
    """The fastest TRL run's steps/s, None without TRL runs (--no-trl)."""
    speeds = [r["steps_per_s"] for name, r in runs.items() if name.startswith("TRL")]
    return max(speeds, default=None)


def _median_run(repeats: list[dict]) -> dict:
    """The repeat with the median steps/s (its phases stay consistent with its speed)."""
    ordered = sorted(repeats, key=lambda r: r["steps_per_s"])
    return ordered[len(ordered) // 2]


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
