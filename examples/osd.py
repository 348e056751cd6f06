"""Online speculative distillation on the built-in tiny task; pass a.b=value overrides.

A draft trained only on sums of operands below 50 serves sums of operands 50..99; the
target's verdicts on its proposals are distilled into it while it serves, and the token
acceptance rate recovers. Writes runs/osd/acceptance.png (acceptance vs requests served).

python examples/osd.py
python examples/osd.py workers=local serving.temperature=1.0 distill.divergence=jsd distill.beta=0.5
"""

from protege.osd.run import main

if __name__ == "__main__":  # Ray spawns processes that re-import this file
    main("osd")
