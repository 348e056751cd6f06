"""privileged on the built-in tiny task: the student is taught by itself shown the answer
(its frozen starting weights, with a privileged prompt); pass a.b=value overrides, e.g.
trainer.steps=10, or teacher.model=self teacher.live=true for the live self-teacher.

python examples/privileged.py
ray job submit --working-dir . -- python examples/privileged.py
"""

from protege.cli import run_example

if __name__ == "__main__":  # Ray and vLLM spawn processes that re-import this file
    run_example("privileged")
