"""Losses against a teacher with another tokenizer: pure functions over aligned spans.

The cross-tokenizer scorer (`protege.xtok.scorer`) ships, at the first student token of
every aligned span, the teacher's next-token distribution there (in the student's ids over
exact-string pairs for GOLD, sorted for ULD) and the teacher's log-probability of the
span's text. Losses are taken at span starts only, where both models have read the same
text; they are summed and divided by `batch.normaliser()` (all response tokens), so
micro-batches add up like every other loss.

* GOLD-style: on an exact span (one token each side, same string) both distributions are
  coarse-grained onto the paired ids plus one tail bucket holding all unpaired mass on each
  side (`topk_buckets`); on any other span, onto two buckets: "the span's text comes next"
  (the student's probability is the product of its tokens' over the span — the chain
  rule — the teacher's likewise over its own tokens) and "anything else". Then JSD(β).
  With one tokenizer every span is exact and the pairs are the identity: the ordinary loss.
* ULD (Boizard et al. 2024): the Wasserstein-1 distance between the two probability
  vectors sorted in decreasing order, the shorter one padded with zeros, which needs no
  vocabulary map: Σ_i |p_(i) − q_(i)|.

Shapes: B batch, T response tokens, V student vocab, K shipped teacher log-probs.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from protege.algorithms.divergences import (
    jsd_from_logprobs,
    log_probs,
    masked_mean,
    topk_buckets,
)
from protege.algorithms.teacher_view import require
from protege.records import RolloutBatch

CrossTokenizer = Literal["none", "gold", "uld"]
SPAN_CERTAINTY = -1e-6  # log-probs of a span are capped here: "anything else" keeps mass


def span_starts(batch: RolloutBatch) -> Tensor:
    """[B,T] bool: response positions where an aligned span starts (the loss positions)."""
    require(batch, "teacher_span_tokens")
    return (batch.teacher_span_tokens > 0) & batch.response_mask.bool()


def span_sums(token_logp: Tensor, span_tokens: Tensor) -> Tensor:
    """Σ token_logp[b, t : t + span_tokens[b,t]] at every t (0 where span_tokens is 0).
    [B,T] float, [B,T] long -> [B,T]."""
    zeros = torch.zeros_like(token_logp[:, :1])
    running = torch.cat([zeros, token_logp.cumsum(-1)], -1)  # [B,T+1]
    start = torch.arange(token_logp.shape[1], device=token_logp.device).expand_as(span_tokens)
    stop = (start + span_tokens).clamp(max=token_logp.shape[1])
    total = running.gather(-1, stop) - running.gather(-1, start)
    return torch.where(span_tokens > 0, total, zeros)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − e^x) for x ≤ 0, accurate at both ends (Mächler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def span_buckets(span_logp: Tensor, width: int) -> Tensor:
    """[span text, anything else] log-probs, padded with −inf to `width`. [B,T] -> [B,T,width]."""
    capped = span_logp.clamp(max=SPAN_CERTAINTY)
    pair = torch.stack([capped, log1mexp(capped)], -1)
    pad = torch.full((*span_logp.shape, width - 2), -math.inf, dtype=pair.dtype, device=pair.device)
    return torch.cat([pair, pad], -1)


def gold_buckets(
    student_logits: Tensor, batch: RolloutBatch, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """(student, teacher) log-probs on GOLD's buckets at every position. -> 2×[B,T,K+1]."""
    require(batch, "teacher_topk_ids", "teacher_topk_logprobs", "teacher_span_logprobs")
    student_logp = log_probs(student_logits, temperature)
    vocab_s, vocab_t = topk_buckets(
        student_logp,
        batch.teacher_topk_ids,
        batch.teacher_topk_logprobs,
        batch.teacher_tail_logprobs,
    )
    vocab_t = _drop_unreachable_tail(vocab_s, vocab_t)
    width = vocab_s.shape[-1]
    if width < 2:
        raise ValueError("GOLD buckets need at least one paired token and the tail")
    own = student_logp.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)  # [B,T]
    span_s = span_buckets(span_sums(own, batch.teacher_span_tokens), width)
    span_t = span_buckets(batch.teacher_span_logprobs.to(own.dtype), width)
    exact = batch.teacher_span_exact.bool().unsqueeze(-1)
    return torch.where(exact, vocab_s, span_s), torch.where(exact, vocab_t, span_t)


def _drop_unreachable_tail(student: Tensor, teacher: Tensor) -> Tensor:
    """Where the student has no token outside the pairs (its tail is exactly empty), the
    teacher's unpaired mass is mass the student cannot hold: the teacher is renormalised
    over the pairs instead of making every divergence infinite."""
    empty = student[..., -1:] == -math.inf
    dropped = torch.cat([teacher[..., :-1], torch.full_like(teacher[..., -1:], -math.inf)], -1)
    dropped = dropped - torch.logsumexp(dropped, -1, keepdim=True)
    return torch.where(empty, dropped, teacher)


def gold_divergence(
    student_logits: Tensor, batch: RolloutBatch, beta: float, temperature: float = 1.0
) -> Tensor:
    """GOLD-style generalized JSD(β) per position (0 off span starts). [B,T,V] -> [B,T]."""
    student, teacher = gold_buckets(student_logits, batch, temperature)
    per_token = jsd_from_logprobs(student, teacher, beta)
    return torch.where(span_starts(batch), per_token, torch.zeros_like(per_token))


def sorted_distance(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """ULD's Wasserstein-1 distance of two probability vectors sorted decreasingly, the
    shorter zero-padded: Σ_i |p_(i) − q_(i)|. [...,V_s], [...,V_t] -> [...]."""
    width = max(student_probs.shape[-1], teacher_probs.shape[-1])
    ours = _pad_last(student_probs.sort(-1, descending=True).values, width)
    theirs = _pad_last(teacher_probs.sort(-1, descending=True).values, width)
    return (ours - theirs).abs().sum(-1)


def _pad_last(x: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def uld_distance(student_logits: Tensor, batch: RolloutBatch, temperature: float = 1.0) -> Tensor:
    """ULD per position (0 off span starts) against the teacher's K largest probabilities;
    its entries past K count as 0, so K ≥ the teacher's vocabulary is exact. [B,T,V] -> [B,T]."""
    require(batch, "teacher_topk_logprobs")
    student = log_probs(student_logits, temperature).exp()
    teacher = batch.teacher_topk_logprobs.to(student.dtype).exp()
    per_token = sorted_distance(student, teacher)
    return torch.where(span_starts(batch), per_token, torch.zeros_like(per_token))


def cross_tokenizer_loss(
    student_logits: Tensor, batch: RolloutBatch, method: str, beta: float, temperature: float
) -> tuple[Tensor, dict[str, float]]:
    """GOLD's JSD(β) or ULD over span starts, summed and divided by `batch.normaliser()`;
    the metric is the loss under the method's name, plus the share of span starts."""
    starts = span_starts(batch)
    if method == "gold":
        per_token = gold_divergence(student_logits, batch, beta, temperature)
    elif method == "uld":
        per_token = uld_distance(student_logits, batch, temperature)
    else:
        raise ValueError(f"cross_tokenizer must be 'gold' or 'uld', got {method!r}")
    loss = masked_mean(per_token, starts, batch.normaliser())
    share = float(starts.sum()) / max(batch.normaliser(), 1.0)
    return loss, {f"xtok/{method}": loss.item(), "xtok/span_start_share": share}
