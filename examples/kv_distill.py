"""Multi-teacher KV-cache distillation on the built-in tiny task; pass a.b=value overrides.

    python examples/kv_distill.py                        # teachers A + B, router fusion
    python examples/kv_distill.py trainer.workers=local  # every role in this process
    python examples/kv_distill.py algorithm.distill=false   # the control: δ·CE only

Phase 1 of seed 002 (one model read with two prompts = two teachers): give the second
teacher the first one's model and a prefix, and align by characters:

    python examples/kv_distill.py teachers.1.model=builtin:tiny/teacher \\
        'teachers.1.prefix=12+34=46;' algorithm.time_align=char

Prints the student's greedy accuracy before -> after; metrics (kv/loss, kv/mse_k, ...,
kv/route_entropy) go to <output_dir>/metrics.jsonl and wandb, the student to
<output_dir>/final, teacher KV to <output_dir>/teacher_kv/<teacher name>.
"""

from protege.cli import run_example

if __name__ == "__main__":  # Ray spawns processes that re-import this file
    run_example("kv_distill")
