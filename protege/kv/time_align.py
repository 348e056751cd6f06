"""Time alignment of teacher K/V to the student's sequence: resampling, padding, tokenizers.

Shapes: B batch, H kv-heads, T time, D head_dim; K/V are [B,H,T,D], masks are bool [B,T].
Two regimes (SPEC §3.5):

* same tokenizer, different lengths (e.g. a teacher that saw a longer prompt): resample
  the time axis by index (`resample_time`, per segment with `segment_resample`), or pad
  to a common length with a False mask (`pad_time`) — never truncate, a truncated tail
  makes the loss look better than it is;
* different tokenizers on the same text: a soft character-IoU alignment matrix
  A ∈ R^{T_s×T_t} (`char_alignment_matrix`) pools teacher steps onto student steps
  (`pool_teacher`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

ResampleMode = Literal["nearest", "linear"]


def resample_indices(t_src: int, t_dst: int) -> Tensor:
    """Nearest source index for each of `t_dst` output steps. -> LongTensor [t_dst].

    Endpoints are aligned (first→first, last→last): output i takes source
    round(i·(t_src−1)/(t_dst−1)), rounding halves up, in exact integer arithmetic. The result
    is non-decreasing, lies in [0, t_src−1], and is the identity when t_src == t_dst.
    t_dst = 0 gives an empty tensor (whatever t_src); t_dst = 1 gives [0]; t_src = 1 gives
    all zeros; t_src = 0 with t_dst > 0 is a ValueError (nothing to resample from).
    """
    if t_src < 0 or t_dst < 0:
        raise ValueError(f"lengths must be >= 0, got t_src={t_src}, t_dst={t_dst}")
    if t_dst == 0:
        return torch.zeros(0, dtype=torch.long)
    if t_src == 0:
        raise ValueError(f"cannot resample an empty sequence (t_src=0) to t_dst={t_dst} steps")
    if t_dst == 1:
        return torch.zeros(1, dtype=torch.long)
    steps = torch.arange(t_dst, dtype=torch.long)
    indices = (2 * steps * (t_src - 1) + (t_dst - 1)) // (2 * (t_dst - 1))
    return indices.clamp_(0, t_src - 1)


def _linear_weights(t_src: int, t_dst: int) -> tuple[Tensor, Tensor, Tensor]:
    """(lower index, upper index, upper weight) for endpoint-aligned linear interpolation."""
    if t_src == 0 and t_dst > 0:
        raise ValueError(f"cannot resample an empty sequence (t_src=0) to t_dst={t_dst} steps")
    if t_dst <= 1 or t_src <= 1:
        zeros = torch.zeros(t_dst, dtype=torch.long)
        return zeros, zeros, torch.zeros(t_dst, dtype=torch.float64)
    position = torch.arange(t_dst, dtype=torch.float64) * (t_src - 1) / (t_dst - 1)
    lower = position.floor().long().clamp_(0, t_src - 1)
    upper = (lower + 1).clamp_(max=t_src - 1)
    return lower, upper, position - lower


def resample_time(x: Tensor, t_dst: int, dim: int = -2, mode: ResampleMode = "nearest") -> Tensor:
    """Resample axis `dim` of `x` to `t_dst` steps. [...,T_src,...] -> [...,t_dst,...].

    "nearest" gathers by `resample_indices` (works for bool masks too); "linear" blends the
    two neighbouring source steps on the same endpoint-aligned grid (float tensors only).
    """
    t_src = x.shape[dim]
    if mode == "nearest":
        return x.index_select(dim, resample_indices(t_src, t_dst).to(x.device))
    if mode != "linear":
        raise ValueError(f"mode must be 'nearest' or 'linear', got {mode!r}")
    if not x.is_floating_point():
        raise ValueError(f"linear resampling needs a float tensor, got dtype {x.dtype}")
    lower, upper, weight = (t.to(x.device) for t in _linear_weights(t_src, t_dst))
    shape = [1] * x.dim()
    shape[dim] = t_dst
    weight = weight.to(x.dtype).view(shape)
    return x.index_select(dim, lower) * (1 - weight) + x.index_select(dim, upper) * weight


def segment_resample(
    x: Tensor,
    src_lengths: Sequence[int],
    dst_lengths: Sequence[int],
    dim: int = -2,
    mode: ResampleMode = "nearest",
) -> Tensor:
    """Resample each segment (e.g. prompt | reasoning | answer) separately, then concatenate.

    [...,sum(src_lengths),...] -> [...,sum(dst_lengths),...]. Keeps segment boundaries
    aligned, so a long reasoning span cannot bleed into the answer. A segment may be empty
    on both sides; an empty source segment with a non-empty destination is an error.
    """
    if len(src_lengths) != len(dst_lengths):
        raise ValueError(
            f"src_lengths has {len(src_lengths)} segments but dst_lengths has {len(dst_lengths)}"
        )
    if any(n < 0 for n in src_lengths) or any(n < 0 for n in dst_lengths):
        raise ValueError(
            f"segment lengths must be >= 0, got {list(src_lengths)} -> {list(dst_lengths)}"
        )
    if sum(src_lengths) != x.shape[dim]:
        raise ValueError(
            f"src_lengths sum to {sum(src_lengths)} but x has {x.shape[dim]} steps along dim {dim}"
        )
    pieces = []
    for i, (segment, n_dst) in enumerate(zip(x.split(list(src_lengths), dim), dst_lengths)):
        if segment.shape[dim] == 0 and n_dst > 0:
            raise ValueError(
                f"segment {i} is empty in the source but has {n_dst} destination steps"
            )
        pieces.append(resample_time(segment, n_dst, dim, mode))
    if not pieces:
        shape = list(x.shape)
        shape[dim] = 0
        return x.new_zeros(shape)
    return torch.cat(pieces, dim)


def pad_time(x: Tensor, mask: Tensor, length: int, dim: int = -2) -> tuple[Tensor, Tensor]:
    """Right-pad time axis `dim` of x with zeros and the [B,T] mask with False to `length`.

    x [...,T,...], mask [B,T] -> ([...,length,...], [B,length]). Refuses to truncate: a
    `length` shorter than T is a ValueError, since dropping the tail of a sequence hides
    exactly the steps that are hardest to match.
    """
    steps = x.shape[dim]
    if mask.shape[-1] != steps:
        raise ValueError(f"mask has {mask.shape[-1]} steps but x has {steps} along dim {dim}")
    if length < steps:
        raise ValueError(f"pad_time never truncates: length={length} < current length {steps}")
    if length == steps:
        return x, mask.bool()
    pad_shape = list(x.shape)
    pad_shape[dim] = length - steps
    mask_pad = mask.new_zeros((*mask.shape[:-1], length - steps), dtype=torch.bool)
    return torch.cat([x, x.new_zeros(pad_shape)], dim), torch.cat([mask.bool(), mask_pad], -1)


def _place_empty_spans(offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Move zero-length spans (special tokens, reported as (0, 0) by HF fast tokenizers
    wherever they occur) to the end of the text seen so far, so an appended EOS sits at the
    end of the text rather than at character 0."""
    placed, seen_end = [], 0
    for span in offsets:
        start, end = int(span[0]), int(span[1])
        if end < start:
            raise ValueError(f"offset span ({start}, {end}) ends before it starts")
        if start == end and start < seen_end:
            start = end = seen_end
        placed.append((start, end))
        seen_end = max(seen_end, end)
    return placed


def char_alignment_matrix(
    student_offsets: Sequence[tuple[int, int]], teacher_offsets: Sequence[tuple[int, int]]
) -> Tensor:
    """Soft alignment of student to teacher tokens from character spans. -> float32 [T_s,T_t].

    Spans are tokenizer offset mappings (start, end) over the same text. Entry (s, t) is the
    intersection-over-union of the two spans; each row is normalised to sum to 1. A student
    token that overlaps no teacher token (special tokens have zero-length spans) puts weight
    1 on the teacher token nearest in position, i.e. with the smallest
    |start_s − start_t| + |end_s − end_t| (first on ties), after zero-length spans are moved
    to the end of the text before them. Identical tokenizations give the identity.
    T_s = 0 gives [0,T_t]; T_t = 0 gives an all-zero [T_s,0] (nothing to pool from).
    """
    student = torch.tensor(_place_empty_spans(student_offsets), dtype=torch.float64).view(-1, 2)
    teacher = torch.tensor(_place_empty_spans(teacher_offsets), dtype=torch.float64).view(-1, 2)
    if student.shape[0] == 0 or teacher.shape[0] == 0:
        return torch.zeros(student.shape[0], teacher.shape[0])
    s_start, s_end = student[:, 0:1], student[:, 1:2]  # [T_s,1]
    t_start, t_end = teacher[:, 0], teacher[:, 1]  # [T_t]
    intersection = (torch.minimum(s_end, t_end) - torch.maximum(s_start, t_start)).clamp(min=0)
    union = (s_end - s_start) + (t_end - t_start) - intersection
    iou = torch.where(union > 0, intersection / union.clamp(min=1e-12), torch.zeros_like(union))
    row_sum = iou.sum(-1, keepdim=True)
    nearest = ((s_start - t_start).abs() + (s_end - t_end).abs()).argmin(-1)  # [T_s]
    fallback = torch.nn.functional.one_hot(nearest, teacher.shape[0]).double()
    align = torch.where(row_sum > 0, iou / row_sum.clamp(min=1e-12), fallback)
    return align.float()


def stack_alignments(matrices: Sequence[Tensor], t_student: int, t_teacher: int) -> Tensor:
    """Batch per-example [T_s_b,T_t_b] alignments into [B,t_student,t_teacher], zero-padded:
    padded student rows pool nothing, padded teacher columns are never pooled."""
    batch = torch.zeros(len(matrices), t_student, t_teacher)
    for b, matrix in enumerate(matrices):
        rows, cols = matrix.shape
        if rows > t_student or cols > t_teacher:
            raise ValueError(
                f"alignment {b} is [{rows},{cols}], larger than [{t_student},{t_teacher}]"
            )
        batch[b, :rows, :cols] = matrix
    return batch


def pool_teacher(x_t: Tensor, align: Tensor) -> Tensor:
    """Pool teacher steps onto student steps. x_t [B,H,T_t,D], align [B,T_s,T_t] or
    [T_s,T_t] -> [B,H,T_s,D]; out[b,h,s] = Σ_t align[s,t]·x_t[b,h,t]."""
    if x_t.dim() != 4:
        raise ValueError(f"x_t must be [B,H,T_t,D], got shape {tuple(x_t.shape)}")
    if align.shape[-1] != x_t.shape[2]:
        raise ValueError(
            f"align has {align.shape[-1]} teacher steps but x_t has T_t={x_t.shape[2]}"
        )
    align = align.to(device=x_t.device, dtype=x_t.dtype)
    if align.dim() == 2:
        return torch.einsum("st,bhtd->bhsd", align, x_t)
    if align.dim() == 3 and align.shape[0] == x_t.shape[0]:
        return torch.einsum("bst,bhtd->bhsd", align, x_t)
    raise ValueError(
        f"align must be [T_s,T_t] or [B={x_t.shape[0]},T_s,T_t], got shape {tuple(align.shape)}"
    )
