"""gkd on the built-in tiny task; pass a.b=value overrides, e.g. trainer.steps=10.

python examples/gkd.py
ray job submit --working-dir . -- python examples/gkd.py
"""

from protege.cli import run_example

if __name__ == "__main__":  # Ray and vLLM spawn processes that re-import this file
    run_example("gkd")
