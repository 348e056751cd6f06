"""The output head's matmul: nn.Linear (MKL sgemm) vs oneDNN (protege.onednn_head).

The head of SmolLM2-135M-Instruct ([49152, 576] float32) on rows a decoding step (1, 8
sequences) and a teacher / learner forward (64, 256 response positions) produce, at 1 and 2
torch threads, median of `--repeats` calls after one warm-up; then, with `--pair`, one HF
rollout of the real-model job (8 prompts x 32 new tokens, single-threaded) with the head
switched and not. Speed-up > 1 means oneDNN is faster; "max |diff|" is against nn.Linear.

    python benchmarks/onednn_head.py                        # ~1 min
    python benchmarks/onednn_head.py --pair runs/smollm2    # + the rollout, ~2 min
Writes benchmarks/results/onednn_head.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from protege.onednn_head import OneDNNLinear


def seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rows(args: argparse.Namespace) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    plain = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    torch.nn.init.normal_(plain.weight, generator=g)
    fast = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    fast.weight = plain.weight
    fast.__class__ = OneDNNLinear
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for count in (1, 8, 64, 256):
            x = torch.randn(count, args.hidden, generator=g)
            with torch.no_grad():
                mkl = seconds(lambda x=x: plain(x), args.repeats)
                onednn = seconds(lambda x=x: fast(x), args.repeats)
                diff = (plain(x) - fast(x)).abs().max().item()
            rows.append(
                {
                    "threads": threads,
                    "rows": count,
                    "mkl_ms": 1e3 * mkl,
                    "onednn_ms": 1e3 * onednn,
                    "speedup": mkl / onednn,
                    "max_abs_diff": diff,
                }
            )
            print(rows[-1], flush=True)
    return rows


def rollout_seconds(pair: Path, repeats: int) -> dict:
    """One HF rollout of the real-model job with the sampler's head as built, then plain."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from learner_memory import prompt_batch

    from protege.actors.sampler import HFSampler
    from protege.config import load_config
    from protege.records import RolloutPlan

    torch.set_num_threads(1)
    overrides = [f"student.model={pair / 'student'}", f"teacher.model={pair / 'teacher'}"]
    overrides += [
        f"data.train={pair / 'train.jsonl'}",
        "data.test=null",
        "rollout.max_new_tokens=32",
    ]
    config = load_config("gkd", overrides)
    sampler = HFSampler(str(pair / "student"), config.rollout, seed=0)
    job = argparse.Namespace(pair=pair, batch=8)
    prompts = prompt_batch(sampler.tokenizer, job)
    head = sampler.student.get_output_embeddings()
    timed = {}
    for name, cls in (("onednn", type(head)), ("mkl", torch.nn.Linear)):
        head.__class__ = cls
        timed[name] = seconds(lambda: sampler.generate(prompts, RolloutPlan()), repeats)
    return {
        "onednn_s": timed["onednn"],
        "mkl_s": timed["mkl"],
        "speedup": timed["mkl"] / timed["onednn"],
    }


def markdown(result: dict) -> str:
    lines = [
        "# The output head's matmul: nn.Linear (MKL) vs oneDNN",
        "",
        (
            f"[{result['vocab']}, {result['hidden']}] float32 head, median of "
            f"{result['repeats']} calls; torch {result['torch']}, {result['cpu']}."
        ),
        "",
        "| threads | rows | nn.Linear ms | oneDNN ms | speed-up | max abs diff |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["matmul"]:
        lines.append(
            f"| {row['threads']} | {row['rows']} | {row['mkl_ms']:.1f} | {row['onednn_ms']:.1f} "
            f"| {row['speedup']:.2f}x | {row['max_abs_diff']:.1e} |"
        )
    if result.get("rollout"):
        r = result["rollout"]
        lines += [
            "",
            (
                f"HF rollout of the real-model job (8 prompts x 32 new tokens, 1 thread): "
                f"{r['mkl_s']:.2f} s with nn.Linear, {r['onednn_s']:.2f} s with oneDNN "
                f"({r['speedup']:.2f}x)."
            ),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--pair", type=Path, help="also time one rollout on this pair")
    args = parser.parse_args()
    result = {
        "vocab": args.vocab,
        "hidden": args.hidden,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "matmul": matmul_rows(args),
        "rollout": rollout_seconds(args.pair, 3) if args.pair else None,
    }
    text = markdown(result)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "onednn_head.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "onednn_head.md").write_text(text)


if __name__ == "__main__":
    main()
