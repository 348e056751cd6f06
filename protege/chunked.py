"""Per-token functions of the student's logits, evaluated a few positions at a time.

A divergence over the vocabulary builds several [B,T,V] float32 tensors (both sides'
log-softmax, JSD's mixture, exps, products), and autograd keeps most of them for the
backward: at a 49k-152k vocabulary that is hundreds of MB per micro-batch beside the
logits themselves. `per_token` cuts the positions into blocks, runs the function on one
block at a time without keeping its intermediates, and recomputes each block in the
backward, so only the inputs and one block's intermediates are alive at once. Every
function it is used with treats positions independently, so its values and gradients are
those of one call on the whole batch.

Shapes: B rows, T positions, V vocab; a block is [b,t] positions (whole rows while a row
fits in the budget, else a run of tokens within one row), always a view, never a copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Vocabulary entries a block holds (16 MiB per float32 copy): the tiny task's batches are
# one block (no recomputation there); SmolLM2's 49k vocabulary gets 85 positions a block.
LOSS_CHUNK_ELEMENTS = 2**22

ChunkSetting = int | Literal["auto"]
Block = tuple[slice, slice]
PerToken = Callable[..., Tensor | tuple[Tensor, ...]]


def chunk_tokens_for(setting: ChunkSetting, vocab: int) -> int:
    """Positions per block: `setting` itself (0: off), or with "auto" as many as fit
    LOSS_CHUNK_ELEMENTS entries of a `vocab`-wide distribution."""
    if setting == "auto":
        return max(1, LOSS_CHUNK_ELEMENTS // max(vocab, 1))
    return int(setting)


def blocks(rows: int, tokens: int, chunk_tokens: int) -> list[Block]:
    """[rows, tokens] cut into blocks of at most `chunk_tokens` positions: whole rows when
    a row fits, else runs of tokens within each row. 0 (or a budget above the total) is
    one block."""
    if chunk_tokens <= 0 or chunk_tokens >= rows * tokens:
        return [(slice(None), slice(None))]
    if chunk_tokens >= tokens:
        step = chunk_tokens // tokens
        return [(slice(r, r + step), slice(None)) for r in range(0, rows, step)]
    return [
        (slice(r, r + 1), slice(t, t + chunk_tokens))
        for r in range(rows)
        for t in range(0, tokens, chunk_tokens)
    ]


def per_token(
    fn: PerToken, inputs: Sequence[Tensor | None], chunk_tokens: int
) -> Tensor | tuple[Tensor, ...]:
    """fn(*inputs) -> [B,T] tensor(s), evaluated block by block over the inputs' first two
    dims ([B,T,...] each; None passes through). With one block it is exactly fn(*inputs);
    with more, each block's intermediates are freed after its forward and recomputed in
    the backward (checkpointing by hand: a per-block `torch.utils.checkpoint` would give
    each block's gradient as one more full-size zero tensor to add up; here every block
    writes its slice of one gradient buffer per input)."""
    tensors = [x for x in inputs if x is not None]
    if not tensors:
        raise ValueError("per_token needs at least one tensor input")
    rows, tokens = tensors[0].shape[:2]
    for x in tensors:
        if tuple(x.shape[:2]) != (rows, tokens):
            raise ValueError(
                f"per-token inputs cover different positions: {tuple(x.shape)} vs "
                f"{tuple(tensors[0].shape)} (every input is [B,T,...] over the same positions)"
            )
    cuts = blocks(rows, tokens, chunk_tokens)
    if len(cuts) == 1:
        return fn(*inputs)
    shape: dict[str, bool] = {}  # the forward notes whether fn returns one tensor
    outputs = _Blockwise.apply(fn, cuts, shape, *inputs)
    return outputs[0] if shape["single"] else outputs


def student_per_token(student: Any, fn: PerToken, *payload: Tensor | None) -> Any:
    """`student.per_token(fn, *payload)` (protege.student), or one call
    fn(student.logits, *payload) for a bare view that only has logits."""
    if hasattr(student, "per_token"):
        return student.per_token(fn, *payload)
    return fn(student.logits, *payload)


def _block(inputs: Sequence[Tensor | None], cut: Block) -> list[Tensor | None]:
    return [None if x is None else x[cut] for x in inputs]


def _as_tuple(values: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (values,) if isinstance(values, Tensor) else tuple(values)


class _Blockwise(torch.autograd.Function):
    """fn over blocks; the backward recomputes one block at a time."""

    @staticmethod
    def forward(ctx, fn: PerToken, cuts: list[Block], shape: dict, *inputs: Tensor | None):
        ctx.fn, ctx.cuts = fn, cuts
        ctx.save_for_backward(*inputs)
        outputs: list[Tensor] = []
        for cut in cuts:
            result = fn(*_block(inputs, cut))
            values = _as_tuple(result)
            if not outputs:
                shape["single"] = isinstance(result, Tensor)
                rows, tokens = next(x for x in inputs if x is not None).shape[:2]
                outputs = [v.new_empty((rows, tokens)) for v in values]
            for out, value in zip(outputs, values, strict=True):
                out[cut] = value
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs: Tensor):
        inputs = ctx.saved_tensors
        wanted = ctx.needs_input_grad[3:]
        grads = [torch.zeros_like(x) if need else None for x, need in zip(inputs, wanted)]
        for cut in ctx.cuts:
            block = [
                None if x is None else (x[cut].detach().requires_grad_(need))
                for x, need in zip(inputs, wanted)
            ]
            with torch.enable_grad():
                values = _as_tuple(ctx.fn(*block))
            pairs = [(v, g[cut]) for v, g in zip(values, grad_outputs) if v.requires_grad]
            targets = [x for x, need in zip(block, wanted) if need]
            if not pairs or not targets:
                continue
            parts = torch.autograd.grad(
                [v for v, _ in pairs], targets, [g for _, g in pairs], allow_unused=True
            )
            receivers = [g for g, need in zip(grads, wanted) if need]
            for grad, part in zip(receivers, parts):
                if part is not None:
                    grad[cut] = part
        return (None, None, None, *grads)
