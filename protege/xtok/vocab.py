"""Exact-string vocabulary pairs between a student's and a teacher's tokenizer (GOLD-style).

Two ids are paired when they decode to the same string; the two EOS tokens are paired
whatever their strings ("<eos>" vs "</s>"), since each model ends a response with its own.
A string several ids decode to is paired once (the lowest ids), so the map is one-to-one
and a distribution mapped through it keeps its total mass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class VocabularyMap:
    """Paired ids: student_ids[m] and teacher_ids[m] decode to the same string. [M] each."""

    student_ids: Tensor  # [M] long
    teacher_ids: Tensor  # [M] long
    student_size: int  # ids the student's tokenizer emits
    teacher_size: int  # ids the teacher's tokenizer emits

    @property
    def pairs(self) -> int:
        return int(self.student_ids.numel())

    def summary(self) -> str:
        """One line for the start-up report: how much of each vocabulary is paired."""
        return (
            f"{self.pairs} tokens with the same string in both vocabularies "
            f"({self.pairs / max(self.student_size, 1):.0%} of the student's "
            f"{self.student_size}, {self.pairs / max(self.teacher_size, 1):.0%} of the "
            f"teacher's {self.teacher_size})"
        )


def token_strings(tokenizer) -> dict[str, int]:
    """Decoded string -> lowest id, over every id the tokenizer emits."""
    strings: dict[str, int] = {}
    for token_id in range(len(tokenizer)):
        strings.setdefault(tokenizer.decode([token_id]), token_id)
    return strings


def vocabulary_map(student, teacher) -> VocabularyMap:
    """The exact-string pairs of two tokenizers (see the module docstring)."""
    ours, theirs = token_strings(student), token_strings(teacher)
    eos_s, eos_t = int(student.eos_token_id), int(teacher.eos_token_id)
    pairs = {(eos_s, eos_t)}
    for text, s_id in ours.items():
        t_id = theirs.get(text)
        if t_id is not None and s_id != eos_s and t_id != eos_t and text != "":
            pairs.add((s_id, t_id))
    ordered = sorted(pairs)
    return VocabularyMap(
        student_ids=torch.tensor([s for s, _ in ordered], dtype=torch.long),
        teacher_ids=torch.tensor([t for _, t in ordered], dtype=torch.long),
        student_size=len(student),
        teacher_size=len(teacher),
    )
