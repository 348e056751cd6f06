"""Seconds of a full-vocabulary divergence's forward + backward: written-out gradients
(protege.algorithms.divergence_kernels) vs autograd through the formula.

The real-model job's loss shape by default: [8, 32, 49152] float32 student and teacher
logits, log-softmax on both, then generalized JSD(0.5), forward KL and reverse KL, summed
and back-propagated to the student's logits; cut into protege's loss blocks
(`learner.loss_chunk_tokens=auto`, recomputed in the backward) and as one block. "autograd"
is the textbook formula traced by autograd (the implementation protege used before:
stacked logsumexp for the mixture, masked p·(log p − log q)); both give the same values
(max |diff| printed). Median of `--repeats` after one warm-up, `--threads` torch threads.

    python benchmarks/divergence_kernels.py            # ~1 min
Writes benchmarks/results/divergence_kernels.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from protege.algorithms.divergence_kernels import JSDFromLogprobs, KLFromLogprobs
from protege.chunked import chunk_tokens_for, per_token


def traced_kl(p_logp, q_logp):
    support = p_logp > -math.inf
    diff = torch.where(support, p_logp - q_logp, torch.zeros_like(p_logp))
    return (p_logp.exp() * diff).sum(-1)


def traced_jsd(student_logp, teacher_logp, beta):
    stacked = torch.stack([teacher_logp + math.log(beta), student_logp + math.log1p(-beta)])
    mixture = torch.logsumexp(stacked, dim=0)
    return beta * traced_kl(teacher_logp, mixture) + (1 - beta) * traced_kl(student_logp, mixture)


KERNELS = {
    "autograd": {"jsd": traced_jsd, "kl": traced_kl},
    "written-out": {"jsd": JSDFromLogprobs.apply, "kl": KLFromLogprobs.apply},
}


def loss_fn(kernel: str, divergence: str):
    ops = KERNELS[kernel]

    def fn(student_logits, teacher_logits):
        s = torch.log_softmax(student_logits, -1)
        t = torch.log_softmax(teacher_logits, -1)
        if divergence == "jsd(0.5)":
            return ops["jsd"](s, t, 0.5)
        if divergence == "forward kl":
            return ops["kl"](t, s)
        return ops["kl"](s, t)

    return fn


def time_one(fn, student, teacher, chunk: int, repeats: int) -> tuple[float, torch.Tensor]:
    def run():
        x = student.detach().requires_grad_(True)
        per_token(fn, [x, teacher], chunk).sum().backward()
        return x.grad

    run()
    times, grad = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        grad = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), grad


def measure(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    shape = (args.rows, args.tokens, args.vocab)
    student, teacher = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g) * 3
    auto = chunk_tokens_for("auto", args.vocab)
    rows = []
    for divergence in ("jsd(0.5)", "forward kl", "reverse kl"):
        for chunk in (auto, 0):
            timed = {
                k: time_one(loss_fn(k, divergence), student, teacher, chunk, args.repeats)
                for k in KERNELS
            }
            (slow, slow_grad), (fast, fast_grad) = timed["autograd"], timed["written-out"]
            rows.append(
                {
                    "divergence": divergence,
                    "positions_per_block": chunk or args.rows * args.tokens,
                    "autograd_s": slow,
                    "written_out_s": fast,
                    "speedup": slow / fast,
                    "max_abs_grad_diff": (slow_grad - fast_grad).abs().max().item(),
                }
            )
            print(rows[-1], flush=True)
    return rows


def markdown(result: dict) -> str:
    shape = f"[{result['rows']}, {result['tokens']}, {result['vocab']}]"
    lines = [
        "# Full-vocabulary divergences: written-out gradients vs autograd",
        "",
        (
            f"{shape} float32 logits, log-softmax + divergence, forward + backward; "
            f"{result['threads']} torch thread(s), median of {result['repeats']}; "
            f"torch {result['torch']}."
        ),
        "",
        "| divergence | positions a block | autograd s | written-out s | speed-up | max abs grad diff |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows_measured"]:
        lines.append(
            f"| {r['divergence']} | {r['positions_per_block']} | {r['autograd_s']:.3f} "
            f"| {r['written_out_s']:.3f} | {r['speedup']:.2f}x | {r['max_abs_grad_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = {**vars(args), "torch": torch.__version__, "rows_measured": measure(args)}
    text = markdown(result)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "divergence_kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "divergence_kernels.md").write_text(text)


if __name__ == "__main__":
    main()
