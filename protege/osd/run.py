"""Build an OSD run from its config and execute it: what `examples/osd.py` calls."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from protege.data import read_jsonl
from protege.errors import ProtegeError, SetupError, report
from protege.launch import LocalLauncher, Resources
from protege.metrics_log import MetricsLog
from protege.modeling import (
    check_model_dir,
    check_same_vocabulary,
    load_model_config,
    load_tokenizer,
)
from protege.osd.config import OSDConfig, load_osd_config
from protege.osd.distiller import DraftDistiller
from protege.osd.loop import OSDLoop
from protege.osd.plot import acceptance_curve, plot_acceptance
from protege.osd.records import Request
from protege.osd.server import OSDServer
from protege.usage import HELP_FLAGS, format_rows, section_rows


def traffic(config: OSDConfig) -> list[Request]:
    """The replayed requests: the traffic file's prompts in order (cycled to
    `serving.num_requests`), evenly spaced at `serving.rate` per second."""
    rows = read_jsonl(config.serving.traffic)
    rate = config.serving.rate
    return [
        Request(i, rows[i % len(rows)].prompt, i / rate if rate > 0 else 0.0)
        for i in range(config.serving.num_requests)
    ]


def heldout_prompts(config: OSDConfig) -> list[str]:
    if config.eval.heldout is None:
        return []
    return [row.prompt for row in read_jsonl(config.eval.heldout)[: config.eval.heldout_size]]


def check_setup(config: OSDConfig, requests: list[Request]) -> None:
    """Refuse, before any model loads, what cannot run: one SetupError naming the key."""
    draft = check_model_dir(config.draft.model, "draft.model")
    target = check_model_dir(config.target.model, "target.model")
    tokenizer = load_tokenizer(draft)
    try:
        check_same_vocabulary(tokenizer, load_tokenizer(target))
    except SetupError as error:
        raise SetupError(f"draft.model / target.model: {error}") from None
    limit = min(
        getattr(load_model_config(path), "max_position_embeddings", 1 << 30)
        for path in (draft, target)
    )
    longest = max(len(tokenizer(r.prompt, add_special_tokens=False)["input_ids"]) for r in requests)
    if longest + config.serving.max_new_tokens > limit:
        raise SetupError(
            f"serving.max_new_tokens: the longest prompt ({longest} tokens) plus "
            f"{config.serving.max_new_tokens} new tokens exceeds the models' {limit} positions; "
            "lower serving.max_new_tokens or shorten the prompts"
        )
    if config.learner.num_workers != 1:
        raise SetupError(
            f"learner.num_workers={config.learner.num_workers}: the draft's learner runs as "
            "one rank (a draft is small); set learner.num_workers=1"
        )
    if config.distill.enabled and config.serving.k == 0:
        raise SetupError(
            "distill.enabled needs draft proposals to learn from, but serving.k=0 (no "
            "speculation); set serving.k >= 1 or distill.enabled=false"
        )


def build_loop(config: OSDConfig, launcher: Any) -> tuple[OSDLoop, list[str]]:
    """The loop with its workers spawned by `launcher` (`make_launcher`: threads in-process
    for workers=local, else Ray actors with the configured CPUs/GPUs), and the held-out
    prompts."""
    requests = traffic(config)
    heldout = heldout_prompts(config)
    check_setup(config, requests)
    serving = Resources(config.serving.num_cpus, config.serving.num_gpus)
    server = launcher.spawn("osd-server", OSDServer, [serving], [(config,)])[0]
    distiller = None
    if config.distill.enabled:
        from protege.run import free_port

        learning = Resources(config.learner.num_cpus, config.learner.num_gpus)
        args = [(config, free_port())]
        distiller = launcher.spawn("osd-learner", DraftDistiller, [learning], args)[0]
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.jsonl").unlink(missing_ok=True)  # each run writes its own
    return OSDLoop(config, launcher, server, distiller, requests, MetricsLog(config)), heldout


def make_launcher(config: OSDConfig):
    if config.workers == "local":
        return LocalLauncher(threads=True)  # server and learner each on a thread of their own
    from protege.actors.ray_actors import RayLauncher

    return RayLauncher()


def run(config: OSDConfig, launcher: Any = None) -> dict[str, Any]:
    """Serve the traffic; returns the totals and every metrics row (also in summary.json).
    A launcher made here is shut down at the end (Ray: its actors go, so another run in this
    process finds the CPUs free)."""
    own = launcher is None
    launcher = make_launcher(config) if own else launcher
    try:
        loop, heldout = build_loop(config, launcher)
        try:
            totals = loop.run(heldout)
        finally:
            loop.log.close()
    finally:
        if own and hasattr(launcher, "shutdown"):
            launcher.shutdown()
    updates = [e.requests for e in loop.timeline if e.kind == "loaded"]
    summary = {"totals": totals, "rows": loop.rows, "updates_landed_at": updates}
    path = Path(config.output_dir) / "summary.json"
    path.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def main(preset: str = "osd", argv: list[str] | None = None) -> dict[str, Any]:
    """`python examples/osd.py [a.b=value ...]`; a bad input exits 2 with one `error:` block."""
    argv = sys.argv[1:] if argv is None else argv
    if HELP_FLAGS & set(argv):
        print(usage(preset))
        raise SystemExit(0)
    try:
        config = load_osd_config(preset, argv)
        summary = run(config)
    except ProtegeError as error:
        raise SystemExit(report(error)) from None
    print(describe(summary, config))
    return summary


def describe(summary: dict[str, Any], config: OSDConfig) -> str:
    """The run's last lines: acceptance with the initial draft and at the end, held-out KL,
    updates, and the plot written to output_dir."""
    totals, rows = summary["totals"], summary["rows"]
    curve = acceptance_curve(rows)
    path = Path(config.output_dir) / "acceptance.png"
    title = f"OSD: {config.distill.divergence}, k={config.serving.k}"
    plot = plot_acceptance(
        {"online-distilled draft": curve}, summary["updates_landed_at"], path, title
    )
    lines = [
        (
            f"acceptance rate: {totals['initial_draft/acceptance_rate']:.3f} with the initial draft "
            f"({int(totals['initial_draft/requests'])} requests before the first update) -> "
            f"{curve[-1][1]:.3f} over the last {config.eval.every} requests "
            f"({int(totals['total/updates'])} updates, {int(totals['total/requests'])} requests)"
        ),
        (
            f"tokens per target forward {totals['total/tokens_per_round']:.2f}, "
            f"{totals['total/tokens_per_s']:.1f} tokens/s, latency p50 "
            f"{totals['total/latency_p50_ms']:.1f} ms p95 {totals['total/latency_p95_ms']:.1f} ms"
        ),
    ]
    if "total/heldout_kl_first" in totals:
        lines.append(
            f"held-out KL(target || draft): {totals['total/heldout_kl_first']:.3f} -> "
            f"{totals['total/heldout_kl_last']:.3f}"
        )
    lines.append(f"plot: {plot}; metrics: {config.output_dir}/metrics.jsonl")
    return "\n".join(lines)


def usage(preset: str) -> str:
    """The help text of `python examples/osd.py`: every key, its type, value and doc."""
    config = load_osd_config(preset)
    return "\n".join(
        [
            "usage: python examples/osd.py [a.b=value ...]",
            "",
            (
                f"Serves configs/{preset}.yaml's traffic with speculative decoding and distils "
                "the draft online; each a.b=value override sets one key. A bad input prints "
                "one `error: ...` block and exits with code 2."
            ),
            "",
            "keys (type) = this preset's value:",
            *format_rows(list(section_rows(OSDConfig, config, ""))),
        ]
    )
