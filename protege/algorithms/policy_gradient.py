"""Policy-gradient surrogates and per-token log-prob helpers: pure tensor functions.

Shapes: B batch, T response tokens, V vocab.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from protege.chunked import per_token, student_per_token


def token_logprobs(logits: Tensor, token_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """log q(y_t) of the given tokens. logits [B,T,V], token_ids [B,T] -> [B,T].

    z_y/τ − logsumexp(z/τ): the picked logit and the normaliser, without the [B,T,V]
    log-softmax copy (equal to log_softmax(z/τ)[y] up to float rounding)."""
    scaled = scaled_logits(logits, temperature)
    picked = scaled.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


def scaled_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Logits / temperature in float32 at least (as `log_probs` reads them); τ = 1 adds no
    copy of float32 logits."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return logits if temperature == 1.0 else logits / temperature


def sampled_logprobs(student: Any, token_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """`token_logprobs` of the student's response logits, a block of positions at a time
    (`protege.chunked`). token_ids [B,T] -> [B,T]."""
    scored = functools.partial(token_logprobs, temperature=temperature)
    return student_per_token(student, scored, token_ids)


def clipped_surrogate(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_eps: float
) -> Tensor:
    """PPO's clipped objective as a per-token loss. All [B,T] -> [B,T].

    ratio = q_θ/q_old; loss = −min(ratio·A, clip(ratio, 1−ε, 1+ε)·A).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def importance_sampled_pg(
    logprobs: Tensor, behaviour_logprobs: Tensor, advantages: Tensor
) -> Tensor:
    """Per-token loss −(q_θ/q_behaviour)·A; its gradient is −ratio·A·∇log q_θ. [B,T] -> [B,T]."""
    return -torch.exp(logprobs - behaviour_logprobs) * advantages


def next_token_nll(
    logits: Tensor, token_ids: Tensor, mask: Tensor, chunk_tokens: int = 0
) -> Tensor:
    """Summed next-token NLL of right-padded text: position i scores token i+1 where both are
    text, `chunk_tokens` positions at a time (0: all). logits [N,L,V], token_ids/mask [N,L]
    -> scalar."""
    nll = -per_token(token_logprobs, (logits[:, :-1], token_ids[:, 1:]), chunk_tokens)
    targets = mask[:, 1:].bool() & mask[:, :-1].bool()
    return torch.where(targets, nll, torch.zeros_like(nll)).sum()
