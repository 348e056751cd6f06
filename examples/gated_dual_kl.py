"""gated_dual_kl on the built-in tiny task; pass a.b=value overrides, e.g. trainer.steps=10.

python examples/gated_dual_kl.py
ray job submit --working-dir . -- python examples/gated_dual_kl.py
"""

from protege.cli import run_example

if __name__ == "__main__":  # Ray and vLLM spawn processes that re-import this file
    run_example("gated_dual_kl")
