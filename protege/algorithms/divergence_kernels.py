"""KL and generalized JSD over the vocabulary with their gradients written out.

Autograd through `p·(log p − log q)` or JSD's mixture keeps every intermediate [..., V]
tensor and replays a dozen elementwise passes in the backward; at a 49k vocabulary those
passes (and the fresh pages each new tensor touches) cost as much as the student's
matmuls. Both divergences have closed-form gradients with respect to the log-probs,
so each is one `torch.autograd.Function` that keeps a single [..., V] tensor per input it
differentiates (the upstream log-softmax's own backward turns that into logit gradients).

With p = exp(log p), q = exp(log q), M = β·p + (1−β)·q and m = log M:

    KL(p‖q)  = Σ p (log p − log q)          ∂/∂log p = p (log p − log q) + p,  ∂/∂log q = −p
    JSD_β    = β Σ p (log p − m) + (1−β) Σ q (log q − m)
                                            ∂/∂log p = β p (log p − m),  ∂/∂log q = (1−β) q (log q − m)

(the mixture's own derivative cancels: β·p/M·(1−β)·q + (1−β)·q/M·(1−β)·q = (1−β)·q.)
Entries with zero probability (log-prob −inf) contribute exactly 0 to the value and the
gradient, never NaN. Shapes: [..., V] log-probs -> [...].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def masked_product(prob: Tensor, logp: Tensor, diff: Tensor) -> Tensor:
    """prob·diff, 0 wherever logp is −inf (where diff may be ±inf or NaN); reuses `diff`."""
    return diff.mul_(prob).masked_fill_(logp == -math.inf, 0.0)


def log_mixture(teacher_logp: Tensor, student_logp: Tensor, beta: float) -> Tensor:
    """log(β·p + (1−β)·q) = hi + log1p(exp(−|a − b|)) with a = log p + log β, b = log q +
    log(1−β), hi = max(a, b): in log space, so nothing underflows, and from elementwise
    kernels that give the same bits whatever slice of positions they run on (the blocks of
    `protege.chunked`; `torch.logaddexp` does not). NaN where both are −inf (masked later)."""
    first = teacher_logp + math.log(beta)
    second = student_logp + math.log1p(-beta)
    spread = torch.sub(first, second).abs_().neg_().exp_().log1p_()
    return torch.maximum(first, second).add_(spread)


class KLFromLogprobs(torch.autograd.Function):
    """KL(p‖q) summed over the last dim, from log p and log q."""

    @staticmethod
    def forward(ctx, p_logp: Tensor, q_logp: Tensor) -> Tensor:
        p = p_logp.exp()
        terms = masked_product(p, p_logp, torch.sub(p_logp, q_logp))
        wants_p, wants_q = ctx.needs_input_grad[:2]
        # ∂/∂log p and ∂/∂log q before the upstream gradient (the latter negated)
        ctx.save_for_backward(terms + p if wants_p else None, p if wants_q else None)
        return terms.sum(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        d_p, p = ctx.saved_tensors
        scale = grad.unsqueeze(-1)
        return (
            None if d_p is None else d_p * scale,
            None if p is None else -(p * scale),
        )


class JSDFromLogprobs(torch.autograd.Function):
    """Generalized JSD(β) for 0 < β < 1, from the teacher's and the student's log-probs."""

    @staticmethod
    def forward(ctx, student_logp: Tensor, teacher_logp: Tensor, beta: float) -> Tensor:
        mixture = log_mixture(teacher_logp, student_logp, beta)
        student_terms = masked_product(student_logp.exp(), student_logp, student_logp - mixture)
        teacher_terms = masked_product(teacher_logp.exp(), teacher_logp, teacher_logp - mixture)
        wants_student, wants_teacher = ctx.needs_input_grad[:2]
        ctx.beta = beta
        ctx.save_for_backward(
            student_terms if wants_student else None, teacher_terms if wants_teacher else None
        )
        return beta * teacher_terms.sum(-1) + (1 - beta) * student_terms.sum(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        student_terms, teacher_terms = ctx.saved_tensors
        scale = grad.unsqueeze(-1)
        return (
            None if student_terms is None else student_terms * ((1 - ctx.beta) * scale),
            None if teacher_terms is None else teacher_terms * (ctx.beta * scale),
            None,
        )
