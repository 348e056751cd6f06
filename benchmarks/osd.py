"""No speculation vs a static draft vs an online-distilled draft, on the same traffic.

    python benchmarks/osd.py                  # 3 arms x 400 requests (configs/osd.yaml), ~3 min
    python benchmarks/osd.py --smoke          # 3 arms x 40 requests in-process, ~1 min
    python benchmarks/osd.py --requests 1000 serving.temperature=1.0   # overrides for every arm
    python benchmarks/osd.py workers=local --tag local   # server and learner as threads

Every arm replays the preset's traffic (the built-in task's shifted domain: sums of operands
50..99, served by a draft trained on operands below 50), back to back, with the server and
the learner as Ray actors (the preset's `workers=ray`: in-process threads would share the
GIL, and the learner's Python would slow serving down). Reported per arm: token acceptance
rate α (accepted / judged draft tokens), draft tokens per target forward, tokens per target
forward, decoding speed (response
tokens per second of service time) and request latency p50/p95, over all requests and over
the second half of the traffic (after the online draft recovered), plus the held-out
KL(target‖draft) at the end. Writes benchmarks/results/osd.md, osd.json and
osd_acceptance.png (or osd_smoke.*).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from protege.osd.config import load_osd_config
from protege.osd.plot import acceptance_curve, plot_acceptance
from protege.osd.run import run

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = {
    "no speculation (target alone)": ["serving.k=0", "distill.enabled=false"],
    "static draft": ["distill.enabled=false"],
    "online-distilled draft (OSD)": [],
}


def run_arm(name: str, arm: list[str], shared: list[str], workdir: Path) -> dict[str, Any]:
    out = workdir / name.split(" ")[0]
    overrides = ["logging.wandb=disabled", f"output_dir={out}", *shared, *arm]
    started = time.perf_counter()
    summary = run(load_osd_config("osd", overrides))
    return {
        "arm": name,
        "overrides": arm,
        "wall_seconds": time.perf_counter() - started,
        "totals": summary["totals"],
        "curve": acceptance_curve(summary["rows"]),
        "updates_landed_at": summary["updates_landed_at"],
    }


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| arm | acceptance α (all / 2nd half) | draft / emitted tokens per target forward "
        "(2nd half) | "
        "tokens/s (all / 2nd half) | latency p50 / p95 ms (2nd half) | updates | "
        "held-out KL end | wall s |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    lines = [head]
    for result in results:
        t = result["totals"]
        acceptance = (
            "–"  # nothing is drafted
            if "serving.k=0" in result["overrides"]
            else f"{t['total/acceptance_rate']:.3f} / {t['second_half/acceptance_rate']:.3f}"
        )
        kl = "–" if acceptance == "–" else f"{t.get('total/heldout_kl_last', float('nan')):.3f}"
        lines.append(
            f"| {result['arm']} | {acceptance} | {t['second_half/drafted_per_round']:.2f} / "
            f"{t['second_half/tokens_per_round']:.2f} | "
            f"{t['total/tokens_per_s']:.1f} / {t['second_half/tokens_per_s']:.1f} | "
            f"{t['second_half/latency_p50_ms']:.1f} / {t['second_half/latency_p95_ms']:.1f} | "
            f"{int(t['total/updates'])} | {kl} | "
            f"{result['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--smoke", action="store_true", help="40 requests per arm")
    parser.add_argument("--workdir", default="runs/bench_osd")
    parser.add_argument("--tag", default="", help="results go to osd_<tag>.* instead of osd.*")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the result files")
    parser.add_argument("overrides", nargs="*", help="a.b=value for every arm")
    args = parser.parse_args()
    torch.set_num_threads(1)
    requests = 40 if args.smoke else args.requests
    shared = [f"serving.num_requests={requests}", *args.overrides]
    if args.smoke:
        # the plumbing only: threads in this process (the example's test covers Ray)
        shared += ["workers=local", "buffer.min_records=8", "eval.every=10", "eval.heldout_size=8"]
    results = [run_arm(name, arm, shared, Path(args.workdir)) for name, arm in ARMS.items()]
    stem = "osd_smoke" if args.smoke else "osd"
    stem = f"{stem}_{args.tag}" if args.tag else stem
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    text = table(results)
    note = f"{requests} requests per arm; overrides for every arm: {' '.join(shared)}"
    (out / f"{stem}.md").write_text(f"{note}\n\n{text}\n", encoding="utf-8")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    online = results[-1]
    curves = {r["arm"]: r["curve"] for r in results if "serving.k=0" not in r["overrides"]}
    plot_acceptance(
        curves, online["updates_landed_at"], out / f"{stem}_acceptance.png", "OSD benchmark"
    )
    print(note)
    print(text)


if __name__ == "__main__":
    main()
