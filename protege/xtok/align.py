"""Aligned spans of two tokenizations of one text, from character offsets.

A span is a run of student tokens and a run of teacher tokens that cover exactly the same
characters: it starts where both tokenizations start a token and ends at the first
character where both end one. At a span's first token both models have read the same text,
so their next-token distributions are comparable there; inside a span they are not (one
model has read part of a token the other has not). A span is *exact* when it is one token on
each side: then both predicted the same string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """Student tokens [student, student + student_len) and teacher tokens
    [teacher, teacher + teacher_len) over the characters [start, end)."""

    student: int
    student_len: int
    teacher: int
    teacher_len: int
    start: int
    end: int

    @property
    def exact(self) -> bool:
        return self.student_len == 1 and self.teacher_len == 1


def piece_offsets(pieces: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of consecutive decoded pieces in their concatenation."""
    offsets, at = [], 0
    for piece in pieces:
        offsets.append((at, at + len(piece)))
        at += len(piece)
    return offsets


def aligned_spans(
    student: Sequence[tuple[int, int]], teacher: Sequence[tuple[int, int]]
) -> list[Span]:
    """The aligned spans of two offset lists over one text, in order.

    Offsets are (start, end) per token, contiguous or with gaps (characters a tokenizer
    dropped); zero-length tokens join the span they sit in. Tokens after the last shared
    boundary (the texts disagree at the end) belong to no span.
    """
    spans: list[Span] = []
    i = j = 0
    while i < len(student) and j < len(teacher):
        i0, j0 = i, j
        start = min(student[i][0], teacher[j][0])
        s_end, t_end = student[i][1], teacher[j][1]
        i, j = i + 1, j + 1
        while s_end != t_end:
            if s_end < t_end and i < len(student):
                s_end, i = max(s_end, student[i][1]), i + 1
            elif t_end < s_end and j < len(teacher):
                t_end, j = max(t_end, teacher[j][1]), j + 1
            else:
                return spans  # one side ran out before the boundaries met again
        while i < len(student) and student[i][1] <= s_end:  # trailing zero-length tokens
            i += 1
        while j < len(teacher) and teacher[j][1] <= t_end:
            j += 1
        spans.append(Span(i0, i - i0, j0, j - j0, start, s_end))
    return spans


def aligned_characters(spans: Sequence[Span], exact_only: bool = False) -> int:
    """Characters the spans cover (only the exact ones with `exact_only`)."""
    return sum(s.end - s.start for s in spans if s.exact or not exact_only)
