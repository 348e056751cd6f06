"""Token-level divergences between student q_θ and teacher p_T: pure tensor functions.

Shapes: B batch, T tokens, V vocab, K teacher top-k. Every public function that takes
logits puts the student first; "forward" is KL(p_T‖q_θ), "reverse" is KL(q_θ‖p_T).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from protege.algorithms.divergence_kernels import JSDFromLogprobs, KLFromLogprobs


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-softmax of temperature-scaled logits, computed in float32 at least."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return torch.log_softmax(logits / temperature, dim=-1)


def kl_from_logprobs(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """KL(p‖q) summed over the last dim. [...,V] log-probs -> [...].

    Terms where p = 0 are exactly 0 (also where q = 0), and their gradient is 0, not NaN.
    The gradient is written out (`divergence_kernels`), not traced through autograd.
    """
    return KLFromLogprobs.apply(p_logp, q_logp)


def jsd_from_logprobs(student_logp: Tensor, teacher_logp: Tensor, beta: float) -> Tensor:
    """Generalized JSD(β) per position. [...,V] log-probs -> [...].

    M = β·p_T + (1−β)·q_θ and JSD = β·KL(p_T‖M) + (1−β)·KL(q_θ‖M). The endpoints are
    special-cased (GKD, Agarwal et al. 2024): β = 0 is forward KL(p_T‖q_θ) and β = 1 is
    reverse KL(q_θ‖p_T) — the mixture formula itself tends to 0 there, not to a KL.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return kl_from_logprobs(teacher_logp, student_logp)
    if beta == 1.0:
        return kl_from_logprobs(student_logp, teacher_logp)
    return JSDFromLogprobs.apply(student_logp, teacher_logp, beta)


def _safe_logsumexp(values: Tensor, dim: int) -> Tensor:
    """logsumexp that is −inf with a zero (not NaN) gradient where every entry is −inf."""
    empty = (values == -math.inf).all(dim, keepdim=True)
    finite = torch.where(empty, torch.zeros_like(values), values)
    return torch.where(empty.squeeze(dim), -math.inf, torch.logsumexp(finite, dim=dim))


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_T‖q_θ) per position (mode-covering). [B,T,V] logits -> [B,T]."""
    return kl_from_logprobs(
        log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
    )


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(q_θ‖p_T) per position (mode-seeking). [B,T,V] logits -> [B,T]."""
    return kl_from_logprobs(
        log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    )


def generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, beta: float, temperature: float = 1.0
) -> Tensor:
    """Generalized JSD(β) per position; β = 0 forward KL, β = 1 reverse KL. [B,T,V] -> [B,T]."""
    return jsd_from_logprobs(
        log_probs(student_logits, temperature), log_probs(teacher_logits, temperature), beta
    )


def topk_buckets(
    student_logp: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logp: Tensor,
    teacher_tail_logp: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Both distributions coarse-grained onto the teacher's top-k ids plus one tail bucket.

    student_logp [B,T,V]; teacher_topk_ids, teacher_topk_logp [B,T,K] -> two [B,T,K+1].
    The student's tail is the exact log-sum-exp of its mass outside the top-k (no clamp).
    The teacher's tail [B,T] is the scorer's exact value when given, else log(1 − Σ top-k
    mass) floored at the top-k log-probs' rounding precision (exactly −inf when K covers
    the vocab): a peaked teacher's float32 top-k mass rounds to 1, and a zero tail would
    make KL(q‖p) infinite wherever the student keeps any mass off the top-k.
    Coarse-graining never increases a divergence, so the top-k value is a lower bound of
    the full-vocabulary one and equals it when the tail holds no mass.
    """
    student_top = student_logp.gather(-1, teacher_topk_ids)
    outside = student_logp.scatter(-1, teacher_topk_ids, -math.inf)
    student_tail = _safe_logsumexp(outside, dim=-1).unsqueeze(-1)
    if teacher_tail_logp is not None:
        teacher_tail = teacher_tail_logp.unsqueeze(-1)
    elif teacher_topk_ids.shape[-1] >= student_logp.shape[-1]:
        teacher_tail = torch.full_like(student_tail, -math.inf)
    else:
        teacher_mass = teacher_topk_logp.double().exp().sum(-1, keepdim=True)
        resolution = torch.finfo(teacher_topk_logp.dtype).eps
        teacher_tail = torch.log((1.0 - teacher_mass).clamp_min(resolution))
    return (
        torch.cat([student_top, student_tail], dim=-1),
        torch.cat(
            [teacher_topk_logp.to(student_logp.dtype), teacher_tail.to(student_logp.dtype)], -1
        ),
    )


def topk_generalized_jsd(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    beta: float,
    temperature: float = 1.0,
    teacher_tail_logprobs: Tensor | None = None,
) -> Tensor:
    """Generalized JSD(β) over the teacher's top-k + tail. [B,T,V], [B,T,K] -> [B,T].

    `temperature` scales the student logits; the teacher's top-k log-probs must have been
    computed at the same temperature by the scorer.
    """
    student, teacher = topk_buckets(
        log_probs(student_logits, temperature),
        teacher_topk_ids,
        teacher_topk_logprobs,
        teacher_tail_logprobs,
    )
    return jsd_from_logprobs(student, teacher, beta)


Estimator = Literal["k1", "k2", "k3"]


def sampled_reverse_kl(
    student_logprobs: Tensor, teacher_logprobs: Tensor, kind: Estimator = "k1"
) -> Tensor:
    """Single-sample estimates of KL(q_θ‖p_T) from tokens sampled from q_θ. [B,T] -> [B,T].

    k1 = log q − log p (unbiased, high variance, can be negative); k2 = ½(log q − log p)²
    (biased, low variance); k3 = (p/q − 1) − log(p/q) (unbiased, always ≥ 0).
    """
    log_ratio = student_logprobs - teacher_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of `values` where `mask` is true; masked entries (even inf/NaN) contribute 0."""
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum()


def masked_mean(values: Tensor, mask: Tensor, count: float | Tensor | None = None) -> Tensor:
    """Σ values·mask / count, with count = Σ mask unless given; never divides by zero.

    Pass the token count of the *global* batch so micro-batches and data-parallel ranks
    each contribute their share and the summed gradient equals the whole batch's.
    """
    if count is None:
        count = mask.sum()
    count = torch.as_tensor(count, dtype=values.dtype, device=values.device)
    return masked_sum(values, mask) / count.clamp_min(1.0)


def skew_forward_kl(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> Tensor:
    """α-skew KL, SKL^(α)(p_T, q_θ) = KL(p_T ‖ α·p_T + (1−α)·q_θ). [...,V] -> [...].

    DistiLLM (Ko et al. 2024, §3.1): α = 0 is forward KL(p_T‖q_θ), α = 1 is 0; for α > 0 it
    stays finite where q_θ has no mass. The gradient flows through the mixture's q_θ term.
    """
    mixture = _mixture_logprobs(teacher_logp, student_logp, alpha)
    return kl_from_logprobs(teacher_logp, mixture)


def skew_reverse_kl(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> Tensor:
    """α-skew reverse KL, SRKL^(α)(p_T, q_θ) = KL(q_θ ‖ (1−α)·p_T + α·q_θ). [...,V] -> [...].

    DistiLLM (Ko et al. 2024, §3.1): α = 0 is reverse KL(q_θ‖p_T), α = 1 is 0; for α > 0 it
    stays finite (≤ −log α) where the teacher has no mass.
    """
    mixture = _mixture_logprobs(student_logp, teacher_logp, alpha)
    return kl_from_logprobs(student_logp, mixture)


def _mixture_logprobs(first_logp: Tensor, second_logp: Tensor, weight: float) -> Tensor:
    """log(w·a + (1−w)·b) from log a, log b; the endpoints w = 0, 1 are exactly log b, log a."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {weight}")
    if weight == 0.0:
        return second_logp
    if weight == 1.0:
        return first_logp
    return _safe_logsumexp(
        torch.stack([first_logp + math.log(weight), second_logp + math.log1p(-weight)]), dim=0
    )
