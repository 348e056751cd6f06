"""gkd from a teacher with another tokenizer (protege.xtok) on the built-in tiny task.

python examples/cross_tokenizer.py                               # GOLD-style, BPE teacher
python examples/cross_tokenizer.py algorithm.cross_tokenizer=uld # ULD
python examples/cross_tokenizer.py teacher.model=builtin:tiny/teacher  # same tokenizer
"""

from protege.cli import run_example

if __name__ == "__main__":  # Ray and vLLM spawn processes that re-import this file
    run_example("cross_tokenizer")
