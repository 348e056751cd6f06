"""Multi-teacher distillation on the built-in tiny task: two specialist teachers (sums below
100 / 100 and over), one student; pass a.b=value overrides.

    python examples/multi_teacher.py                          # each row routed to its teacher
    python examples/multi_teacher.py fusion.mode=confidence   # per token, the surer teacher
    python examples/multi_teacher.py fusion.mode=learned      # per row, a router trained on
                                                              # the exact-match reward
    python examples/multi_teacher.py trainer.workers=local    # every role in this process

Prints the student's greedy accuracy before -> after; per-teacher metrics
(teacher/<name>/reverse_kl, teacher/<name>/share, teacher/<name>/seconds) and, with
fusion.mode=learned, the router's (router/loss, router/entropy, router/agreement, ...) go to
<output_dir>/metrics.jsonl and wandb. benchmarks/multi_teacher.py compares it with each
single-teacher run.
"""

from protege.cli import run_example

if __name__ == "__main__":  # Ray spawns processes that re-import this file
    run_example("multi_teacher")
