"""Multi-teacher KV-cache distillation on the built-in tiny task; pass a.b=value overrides.

    python examples/kv_distill.py                              # two teachers, CPU, ~1 min
    python examples/kv_distill.py phase1.enabled=true align.time=char   # one model, two prompts
    python examples/kv_distill.py trainer.workers=ray          # teachers as Ray actors

Prints the student's accuracy and perplexity before → after, and where the plots went.
"""

import sys

from protege.errors import ProtegeError, report
from protege.kv.config import load_kv_config
from protege.kv.trainer import run_kv_distill


def main(argv: list[str]) -> None:
    config = load_kv_config("kv_distill", argv)
    teachers = ", ".join(
        f"{t.name}={t.model}{' (prefix ' + repr(t.prefix) + ')' if t.prefix else ''}"
        for t in config.effective_teachers()
    )
    print(
        f"KV distillation: student {config.student} <- {teachers}; fusion {config.fusion.kind}",
        flush=True,
    )
    summary = run_kv_distill(config)
    before, after = summary["before"], summary["after"]
    print(f"accuracy   {before['accuracy']:.3f} -> {after['accuracy']:.3f}")
    print(f"perplexity {before['perplexity']:.3f} -> {after['perplexity']:.3f}")
    print(
        f"held-out KV loss {summary['heldout_kv'][0]:.3f} -> {summary['heldout_kv'][-1]:.3f} "
        f"({summary['steps']} steps, {summary['train_seconds']:.1f} s)"
    )
    print(f"outputs in {config.output_dir}: " + ", ".join(summary.get("plots", [])))


if __name__ == "__main__":  # Ray spawns processes that re-import this file
    try:
        main(sys.argv[1:])
    except ProtegeError as error:  # one `error:` block, exit code 2 (PROTEGE_DEBUG=1: traceback)
        sys.exit(report(error))
