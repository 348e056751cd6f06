"""A frozen teacher in float32, bfloat16-stored (protege.cpu_bf16) and, optionally, plain
bfloat16 (emulated on CPUs without AVX512-BF16/AMX), on the real-model job's scoring shape.

Each variant runs in a fresh process: `load_frozen_model(teacher, dtype)` (the float32
variant loads as `float32`; "bf16 stored" is what `teacher.dtype=bfloat16` gives on such a
CPU; "bf16 emulated" builds the plain bfloat16 model) scores 8 random prompts of 72 tokens
(logits at the 33 positions a 32-token response needs), single-threaded, median of
`--repeats` after a warm-up. Reported: parameter bytes, peak RSS of the process, seconds per
forward, and the reverse KL per token and largest log-prob difference to the float32
teacher.

    python benchmarks/cpu_bf16.py --pair /tmp/smollm2 [--emulated]
Writes benchmarks/results/cpu_bf16.{md,json}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("float32", "bf16 stored", "bf16 emulated")


def status_gib(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise KeyError(field)


def child(variant: str, teacher: str, repeats: int, logits_path: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from protege.cpu_bf16 import native_bf16_cpu
    from protege.modeling import load_frozen_model, load_model

    torch.set_num_threads(1)
    if variant == "bf16 emulated":
        model = load_model(teacher, "bfloat16").eval().requires_grad_(False)
    else:
        model = load_frozen_model(teacher, "float32" if variant == "float32" else "bfloat16")
    gc.collect()
    load_peak, loaded = status_gib("VmHWM"), status_gib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts: the scoring's own peak
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (8, 72), generator=g)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            logits = model(input_ids=ids, logits_to_keep=33).logits.float()
            times.append(time.perf_counter() - start)
    torch.save(logits.log_softmax(-1), logits_path)
    return {
        "variant": variant,
        "native_bf16_cpu": native_bf16_cpu(),
        "param_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
        "load_peak_rss_gib": load_peak,
        "loaded_rss_gib": loaded,
        "scoring_peak_rss_gib": status_gib("VmHWM"),
        "seconds": statistics.median(times[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--emulated", action="store_true", help="also plain bfloat16 (slow)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    teacher = str(args.pair / "teacher")
    if args.child:
        print(json.dumps(child(args.child[0], teacher, args.repeats, args.child[1])))
        return
    import torch

    rows, work = [], RESULTS / ".cpu_bf16"
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for variant in VARIANTS if args.emulated else VARIANTS[:2]:
        path = work / f"{variant.replace(' ', '_')}.pt"
        command = [
            sys.executable,
            __file__,
            "--pair",
            str(args.pair),
            "--repeats",
            str(args.repeats),
        ]
        out = subprocess.run(
            [*command, "--child", variant, str(path)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        rows.append({**json.loads(out.strip().splitlines()[-1]), "logprobs": path})
    reference = torch.load(rows[0]["logprobs"])
    for row in rows:
        logp = torch.load(row.pop("logprobs"))
        row["reverse_kl"] = float((logp.exp() * (logp - reference)).sum(-1).mean())
        row["max_logprob_diff"] = float((logp - reference).abs().max())
    for path in work.iterdir():
        path.unlink()
    work.rmdir()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_bf16.json").write_text(
        json.dumps({"args": vars(args) | {"pair": str(args.pair)}, "rows": rows}, indent=2)
    )
    text = markdown(rows)
    (RESULTS / "cpu_bf16.md").write_text(text)
    print(text)


def markdown(rows: list[dict]) -> str:
    lines = [
        (
            "| teacher weights | parameters GiB | RSS GiB: loading peak, loaded, scoring peak "
            "| s / forward | reverse KL to fp32 | max abs log-prob diff |"
        ),
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['param_gib']:.3f} | {r['load_peak_rss_gib']:.2f}, "
            f"{r['loaded_rss_gib']:.2f}, {r['scoring_peak_rss_gib']:.2f} | {r['seconds']:.2f} "
            f"| {r['reverse_kl']:.2e} | {r['max_logprob_diff']:.3f} |"
        )
    native = rows[0]["native_bf16_cpu"]
    lines.append("")
    lines.append(f"This CPU computes bfloat16 natively: {native}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
