"""Teacher-forced sequences for KV distillation, and their alignment onto the student's time axis.

Every model reads the same gold text `prompt ⧺ completion` (teacher forcing, SPEC §3.5); a
teacher may see an extra `prefix` (phase 1 of seed 002: one model, two prompts). Sequences
are right-padded and never truncated; masks mark real tokens.

Shapes: B batch, T_s student tokens, T_t teacher tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from protege.kv.time_align import char_alignment_matrix, resample_indices

TimeAlign = Literal["resample", "segment", "char"]


@dataclass(frozen=True)
class KVBatch:
    """One tokenised, right-padded, teacher-forced batch (CPU tensors)."""

    input_ids: Tensor  # [B,T] long
    attention_mask: Tensor  # [B,T] bool, True on real tokens
    answer_mask: Tensor  # [B,T] bool, True on completion tokens (the CE targets)
    prompt_lengths: Tensor  # [B] long, tokens before the completion (prefix included)
    task_ids: Tensor  # [B] long, index into the task names (task-conditional fusion)
    offsets: tuple[tuple[tuple[int, int], ...], ...]  # per row, per real token: char span
    prefix_chars: int = 0  # characters of prefix before the shared text

    @property
    def positions(self) -> Tensor:
        """Position ids [B,T] (0-based over real tokens; pads repeat the last)."""
        mask = self.attention_mask.long()
        return (mask.cumsum(-1) - 1).clamp_min(0)

    @property
    def lengths(self) -> Tensor:
        return self.attention_mask.sum(-1)

    def select(self, index: Tensor) -> KVBatch:
        """Rows `index`, with columns past the longest selected row dropped (all padding)."""
        width = int(self.attention_mask[index].sum(-1).max()) if len(index) else 0
        offsets = tuple(self.offsets[i] for i in index.tolist())
        return replace(
            self,
            input_ids=self.input_ids[index, :width],
            attention_mask=self.attention_mask[index, :width],
            answer_mask=self.answer_mask[index, :width],
            prompt_lengths=self.prompt_lengths[index],
            task_ids=self.task_ids[index],
            offsets=offsets,
        )


def carry_task(row: dict[str, str]) -> str:
    """The built-in task's two sub-tasks: sums that carry into a third digit, and the rest."""
    return "carry" if len(row.get("answer", "")) > 2 else "plain"


TASKS = ("plain", "carry")


def make_batch(tokenizer, rows: list[dict[str, str]], prefix: str = "") -> KVBatch:
    """Tokenise `prefix ⧺ prompt ⧺ completion` per row, right-padded. No truncation."""
    if not rows:
        raise ValueError("make_batch needs at least one row")
    texts = [prefix + row["prompt"] + row["completion"] for row in rows]
    encoded = tokenizer(
        texts,
        padding=True,
        padding_side="right",
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    mask = encoded["attention_mask"].bool()
    prompt_lengths = torch.tensor(
        [
            len(tokenizer(prefix + row["prompt"], add_special_tokens=False)["input_ids"])
            for row in rows
        ]
    )
    columns = torch.arange(mask.shape[1])[None]
    answer_mask = (columns >= prompt_lengths[:, None]) & mask
    offsets = tuple(
        tuple((int(a), int(b)) for (a, b), keep in zip(spans.tolist(), row_mask.tolist()) if keep)
        for spans, row_mask in zip(encoded["offset_mapping"], mask)
    )
    return KVBatch(
        input_ids=encoded["input_ids"],
        attention_mask=mask,
        answer_mask=answer_mask,
        prompt_lengths=prompt_lengths,
        task_ids=torch.tensor([TASKS.index(carry_task(row)) for row in rows]),
        offsets=offsets,
        prefix_chars=len(prefix),
    )


def alignment_matrices(student: KVBatch, teacher: KVBatch, mode: TimeAlign) -> Tensor | None:
    """Soft map from teacher steps to student steps. -> [B,T_s,T_t] (rows of pads are 0),
    or None when both read the same tokens (identity: nothing to align).

    * "resample": the teacher's whole real sequence resampled uniformly onto the student's
      (nearest index) — the seed's basic alignment;
    * "segment": prompt and completion resampled separately (seed 004's segment-aware
      alignment), so a longer teacher prompt cannot shift the answer;
    * "char": character-IoU of token spans over the shared text (different tokenizers);
      the teacher's prefix characters overlap nothing in the student's text.
    """
    same = (
        student.input_ids.shape == teacher.input_ids.shape
        and bool((student.input_ids == teacher.input_ids).all())
        and student.prefix_chars == teacher.prefix_chars
    )
    if same:
        return None
    batch, t_s, t_t = (
        student.input_ids.shape[0],
        student.input_ids.shape[1],
        teacher.input_ids.shape[1],
    )
    align = torch.zeros(batch, t_s, t_t)
    for b in range(batch):
        n_s, n_t = int(student.lengths[b]), int(teacher.lengths[b])
        if mode == "char":
            shift = teacher.prefix_chars - student.prefix_chars
            spans_t = [(a - shift, e - shift) for a, e in teacher.offsets[b]]
            spans_s = list(student.offsets[b])
            align[b, :n_s, :n_t] = char_alignment_matrix(spans_s, spans_t)
            continue
        if mode == "resample":
            src, dst = [n_t], [n_s]
        elif mode == "segment":
            p_s, p_t = int(student.prompt_lengths[b]), int(teacher.prompt_lengths[b])
            src, dst = [p_t, n_t - p_t], [p_s, n_s - p_s]
        else:
            raise ValueError(f"time alignment must be resample, segment or char, got {mode!r}")
        start_s, start_t = 0, 0
        for n_src, n_dst in zip(src, dst):
            index = resample_indices(n_src, n_dst) + start_t
            align[b, torch.arange(start_s, start_s + n_dst), index] = 1.0
            start_s, start_t = start_s + n_dst, start_t + n_src
    return align
