"""Seconds of one AdamW step on the SmolLM2 student's parameter shapes: torch's per-tensor
loop (`foreach=False`), its multi-tensor `foreach` path and its fused kernel (what protege's
learner uses on CPU and CUDA), and the largest difference of the updated weights from the loop's.

The 11-layer student of scripts/build_smollm2_pair.py: a [49152, 576] tied embedding and per
layer q/o [576, 576], k/v [192, 576], gate/up [1536, 576], down [576, 1536] and two norms,
float32 with random gradients; lr 1e-4, no weight decay; median of `--repeats` steps after
one, `--threads` torch threads.

    python benchmarks/fused_adamw.py            # ~30 s
Writes benchmarks/results/fused_adamw.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
SHAPES = [(49152, 576)] + (LAYER + [(576,), (576,)]) * 11
VARIANTS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def parameters() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


def measure(repeats: int) -> dict[str, dict]:
    results, weights = {}, {}
    for name, options in VARIANTS.items():
        params = parameters()
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **options)
        optimizer.step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        weights[name] = [p.detach() for p in params]
        results[name] = {"seconds": statistics.median(times)}
    for name in VARIANTS:
        pairs = zip(weights[name], weights["loop"], strict=True)
        results[name]["max_abs_diff"] = max((a - b).abs().max().item() for a, b in pairs)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = measure(args.repeats)
    count = sum(p.numel() for p in parameters())
    lines = [
        "# One AdamW step on the SmolLM2 student's parameters",
        "",
        (
            f"{count / 1e6:.1f} M float32 parameters, {args.threads} thread(s), median of "
            f"{args.repeats} steps; torch {torch.__version__}."
        ),
        "",
        "| AdamW | s/step | vs loop | max abs diff from loop |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, row in results.items():
        ratio = results["loop"]["seconds"] / row["seconds"]
        lines.append(
            f"| {name} | {row['seconds']:.3f} | {ratio:.1f}x | {row['max_abs_diff']:.1e} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fused_adamw.json").write_text(
        json.dumps({"threads": args.threads, "parameters": count, "results": results}, indent=2)
    )
    (RESULTS / "fused_adamw.md").write_text(text)


if __name__ == "__main__":
    main()
