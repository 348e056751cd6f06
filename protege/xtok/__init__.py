"""Cross-tokenizer distillation: a teacher whose tokenizer is not the student's.

The teacher re-reads the student's text with its own tokenizer (`scorer`); character
offsets split the response into aligned spans, stretches of text that both tokenizations
start and end at the same character (`align`); exact-string vocabulary pairs (`vocab`) let
GOLD-style losses compare the two distributions token by token, and ULD compares their
sorted probabilities (`protege.algorithms.cross_tokenizer`).
"""
