"""The learner's peak memory and step time with chunked per-token losses, on a real pair.

The learner alone (`protege.actors.learner.Learner`, in a fresh process per run, so its
peak RSS is the learner's): SmolLM2-135M-Instruct's 11-layer student
(`scripts/build_smollm2_pair.py`), GKD's generalized JSD (β = 0.5) over the full
vocabulary (teacher_output=full, as in benchmarks/throughput_real.py) and over the
teacher's top-64 + tail, on one batch the student sampled (`--batch` prompts with the
chat template, `--new-tokens` tokens at temperature 1) and the teacher scored, trained for
`--warmup` + `--steps` steps at lr 1e-4, fp32, one micro-batch. Each payload runs with the
loss unchunked (`learner.loss_chunk_tokens=0`, the code path before chunking) and chunked
(`auto`: 2^22 vocabulary entries a block, 85 positions at V = 49,152), repeats
interleaved. Peak RSS is `memory/learner_peak_gib` after the last step (model, AdamW state
and the step's transients); seconds are `learner/seconds` (median of the measured steps),
noisy on a shared machine. The losses of every step are compared between the two
settings: they must be identical.

    python scripts/build_smollm2_pair.py --out runs/smollm2
    python benchmarks/learner_memory.py --pair runs/smollm2          # ~5 min on 2 cores
    python benchmarks/learner_memory.py --pair runs/smollm2 --smoke  # 1 step, no files
Writes benchmarks/results/learner_memory.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fresh_process import clean_env, report, run_fresh

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAYLOADS = ("full", "topk")
CHUNKS = ("0", "auto")  # learner.loss_chunk_tokens: off, the default budget


def prepare(args: argparse.Namespace, folder: Path) -> None:
    """One student-sampled batch, scored by the teacher with each payload, to safetensors."""
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file

    from protege.actors.sampler import HFSampler
    from protege.actors.teacher import TeacherScorer
    from protege.config import load_config
    from protege.records import RolloutPlan

    config = load_config("gkd", common_overrides(args, "0", folder))
    sampler = HFSampler(str(args.pair / "student"), config.rollout, seed=0)
    batch = sampler.generate(prompt_batch(sampler.tokenizer, args), RolloutPlan(topk=64))
    del sampler
    teacher = TeacherScorer(str(args.pair / "teacher"), micro_batch_size=args.batch)
    for payload in PAYLOADS:
        scored = teacher.score(batch, RolloutPlan(teacher_need=payload, topk=64))
        tensors = {
            f.name: getattr(scored, f.name).contiguous()
            for f in dataclasses.fields(scored)
            if isinstance(getattr(scored, f.name), torch.Tensor)
        }
        save_file(tensors, str(folder / f"{payload}.safetensors"))


def prompt_batch(tokenizer, args: argparse.Namespace):
    """The pair's first `--batch` training prompts in the chat template, left-padded."""
    import torch

    from protege.records import PromptBatch

    rows = (args.pair / "train.jsonl").read_text().splitlines()[: args.batch]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": json.loads(row)["prompt"]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for row in rows
    ]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    width = max(len(row) for row in ids)
    pad = int(tokenizer.pad_token_id)
    prompt_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids])
    mask = torch.tensor([[False] * (width - len(row)) + [True] * len(row) for row in ids])
    return PromptBatch(prompt_ids=prompt_ids, prompt_mask=mask)


def common_overrides(args: argparse.Namespace, chunk: str, folder: Path) -> list[str]:
    return [
        f"student.model={args.pair / 'student'}",
        f"teacher.model={args.pair / 'teacher'}",
        f"data.train={args.pair / 'train.jsonl'}",
        "data.test=null",
        f"trainer.batch_size={args.batch}",
        f"trainer.steps={args.warmup + args.steps}",
        f"rollout.max_new_tokens={args.new_tokens}",
        "algorithm.beta=0.5",
        "learner.lr=1e-4",
        f"learner.micro_batch_size={args.batch}",
        f"learner.loss_chunk_tokens={chunk}",
        "logging.wandb=disabled",
        f"output_dir={folder / 'run'}",
    ]


def run_one(args: argparse.Namespace) -> dict:
    """Train the learner on the saved batch; peak RSS, seconds per step, losses."""
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import load_file

    from protege.actors.learner import Learner
    from protege.chunked import blocks, chunk_tokens_for
    from protege.config import load_config
    from protege.memory import peak_metrics
    from protege.records import RolloutBatch

    payload, chunk = args.run.split(",")
    folder = Path(args.folder)
    batch = RolloutBatch(**load_file(str(folder / f"{payload}.safetensors")))
    overrides = common_overrides(args, chunk, folder)
    overrides += [f"algorithm.teacher_output={payload}", "algorithm.topk=64"]
    learner = Learner(load_config("gkd", overrides))
    setup = peak_metrics("learner")["memory/learner_peak_gib"]
    rows = [learner.train(batch) for _ in range(args.warmup + args.steps)]
    vocab = learner.model.config.vocab_size
    rows_, tokens = batch.response_ids.shape
    setting = chunk if chunk == "auto" else int(chunk)
    held = vocabulary_bytes_held(learner, batch, setting, vocab)
    return {
        "payload": payload,
        "loss_chunk_tokens": chunk,
        "blocks": len(blocks(rows_, tokens, chunk_tokens_for(setting, vocab))),
        "response_tokens": int(batch.response_mask.sum()),
        "shape": [rows_, tokens, vocab],
        "setup_peak_gib": setup,
        "peak_gib": peak_metrics("learner")["memory/learner_peak_gib"],
        "seconds_per_step": statistics.median(
            row["learner/seconds"] for row in rows[args.warmup :]
        ),
        "losses": [row["learner/loss"] for row in rows],
        "vocab_bytes_held": held,
        "threads": torch.get_num_threads(),
    }


def vocabulary_bytes_held(learner, batch, setting, vocab: int) -> int:
    """Bytes of [..., V] tensors autograd keeps for the backward of one loss (distinct
    storages: the logits, the teacher's, every vocabulary-wide intermediate): what chunking
    removes, measured exactly, free of the allocator and of the machine's load."""
    import torch

    from protege.student import StudentForward

    storages: dict[int, int] = {}

    def pack(tensor):
        if tensor.dim() and tensor.shape[-1] == vocab:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    student = StudentForward(learner.model, batch, chunk_tokens=setting)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        learner.algorithm.loss(student, batch)
    return sum(storages.values())


def run_isolated(name: str, args: argparse.Namespace, folder: Path, extra: list[str]) -> dict:
    env = clean_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
    command = [sys.executable, __file__, *extra, f"--folder={folder}", *forwarded(args)]
    return run_fresh(name, command, env, timeout=3600)


def forwarded(args: argparse.Namespace) -> list[str]:
    return [
        f"--pair={args.pair}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--batch={args.batch}",
        f"--new-tokens={args.new_tokens}",
        f"--threads={args.threads}",
    ]


def summarise(runs: dict[str, list[dict]], args: argparse.Namespace, load: str) -> dict:
    table = {}
    for name, repeats in runs.items():
        first = repeats[0]
        payload = first["payload"]
        table[name] = {
            "payload": payload,
            "loss_chunk_tokens": first["loss_chunk_tokens"],
            "blocks": first["blocks"],
            "peak_gib": statistics.median(r["peak_gib"] for r in repeats),
            "setup_peak_gib": statistics.median(r["setup_peak_gib"] for r in repeats),
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in repeats),
            "vocab_bytes_held": first["vocab_bytes_held"],
            "losses": first["losses"],
            "repeats": repeats,
        }
    for row in table.values():
        off = table[f"{row['payload']},0"]
        row["peak_saved_gib"] = off["peak_gib"] - row["peak_gib"]
        row["losses_identical_to_unchunked"] = all(
            r["losses"] == off["losses"]
            for r in runs[f"{row['payload']},{row['loss_chunk_tokens']}"]
        )
    first = next(iter(runs.values()))[0]
    return {
        "job": {
            "pair": str(args.pair),
            "shape_BTV": first["shape"],
            "response_tokens": first["response_tokens"],
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "threads": args.threads,
            "load_average_before": load,
            "load_average_after": os.getloadavg(),
        },
        "runs": table,
    }


def markdown(results: dict) -> str:
    job = results["job"]
    b, t, v = job["shape_BTV"]
    lines = [
        (
            f"Learner alone, GKD JSD(0.5), batch {b} x {t} response tokens "
            f"({job['response_tokens']} real), V = {v}, fp32, one micro-batch; "
            f"median of {job['repeats']} fresh processes x {job['steps']} steps; "
            f"load average {job['load_average_before']} (shared machine: seconds are noisy)."
        ),
        "",
        (
            "| payload | loss_chunk_tokens | blocks | [..,V] bytes held for backward (MiB) "
            "| learner peak RSS (GiB) | saved (GiB) | peak after setup (GiB) "
            "| s / learner step | losses = unchunked |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["runs"].values():
        lines.append(
            f"| {row['payload']} | {row['loss_chunk_tokens']} | {row['blocks']} "
            f"| {row['vocab_bytes_held'] / 2**20:.0f} "
            f"| {row['peak_gib']:.3f} | {row['peak_saved_gib']:.3f} | {row['setup_peak_gib']:.3f} "
            f"| {row['seconds_per_step']:.2f} | {row['losses_identical_to_unchunked']} |"
        )
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", type=Path, default=ROOT / "runs" / "smollm2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="1 step, 1 repeat, no files")
    parser.add_argument("--name", default="learner_memory", help="results file name")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # payload,chunk: one measured run
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.repeats = 1, 0, 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.prepare:
        prepare(args, Path(args.folder))
        report({})
        return {}
    if args.run:
        report(run_one(args))
        return {}
    if not (args.pair / "teacher").is_dir():
        raise SystemExit(f"no pair in {args.pair}: run scripts/build_smollm2_pair.py --out ...")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="protege-learner-memory-") as tmp:
        started = time.perf_counter()
        run_isolated("prepare", args, Path(tmp), ["--prepare"])
        print(f"batch sampled and scored in {time.perf_counter() - started:.0f} s", flush=True)
        for _ in range(args.repeats):
            for payload in PAYLOADS:
                for chunk in CHUNKS:
                    name = f"{payload},{chunk}"
                    result = run_isolated(name, args, Path(tmp), [f"--run={name}"])
                    runs.setdefault(name, []).append(result)
                    print(
                        f"{name}: peak {result['peak_gib']:.3f} GiB, "
                        f"{result['seconds_per_step']:.2f} s/step",
                        flush=True,
                    )
    results = summarise(runs, args, load)
    print(markdown(results))
    if not args.smoke:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
        (RESULTS / f"{args.name}.md").write_text(markdown(results))
    return results


if __name__ == "__main__":
    main()
