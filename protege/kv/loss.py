"""KV-distillation loss terms: pure, masked functions on tensors (seed 002 §3).

    L = Σ_l w_l·[λK·MSE(K_s,K_f) + λV·MSE(V_s,V_f) + β·(1 − cos) + γ·KL(attn_s‖attn_f)] + δ·CE

Shapes: B batch, H kv-heads, H_q query heads, T tokens, D head_dim, V vocab. Every term is
a mean over real tokens through `masked_mean`, so padding never contributes, and an
all-padding batch gives 0 rather than NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over mask-True entries; 0 when there are none. x, mask broadcastable."""
    mask = mask.to(x.dtype)
    mask = mask.expand_as(x) if mask.shape != x.shape else mask
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def _token_mask(x: Tensor, mask: Tensor) -> Tensor:
    if mask.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"mask must be [B,T]={x.shape[0], x.shape[2]}, got {tuple(mask.shape)}")
    return mask.bool().to(x.device)


def _zero_pads(x: Tensor, mask: Tensor) -> Tensor:
    """x [B,H,T,D] with padded steps set to 0 — before any arithmetic, so that even a NaN
    in a padded slot cannot reach a real token's loss or gradient (0·NaN is NaN)."""
    return torch.where(mask[:, None, :, None], x, torch.zeros_like(x))


def kv_mse(student: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error per real token, averaged over heads and dims.
    [B,H,T,D] ×2, [B,T] -> scalar."""
    mask = _token_mask(student, mask)
    per_token = (
        (_zero_pads(student, mask) - _zero_pads(target, mask)).square().mean(dim=(1, 3))
    )  # [B,T]
    return masked_mean(per_token, mask)


def kv_cosine_distance(student: Tensor, target: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """1 − cosine of each head's vector, averaged over heads and real tokens. -> scalar."""
    mask = _token_mask(student, mask)
    cos = F.cosine_similarity(
        _zero_pads(student, mask), _zero_pads(target, mask), dim=-1, eps=eps
    ).mean(1)
    return masked_mean(1.0 - cos, mask)  # [B,T] -> scalar


def attention_logprobs(queries: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
    """Causal, padding-masked attention log-probabilities. queries [B,H_q,T,D], keys
    [B,H,T,D] (GQA: each KV head serves H_q/H query heads), mask [B,T] -> [B,H_q,T,T];
    disallowed entries get -1e9 (probability exactly 0; finite, so no 0·inf in gradients).
    A pad query row (nothing allowed) is uniform; callers mask it out."""
    heads_q, heads_kv = queries.shape[1], keys.shape[1]
    if heads_q % heads_kv:
        raise ValueError(f"{heads_q} query heads are not a multiple of {heads_kv} key heads")
    mask = mask.bool().to(queries.device)
    queries, keys = _zero_pads(queries, mask), _zero_pads(keys, mask)
    keys = keys.repeat_interleave(heads_q // heads_kv, dim=1)
    scores = queries @ keys.transpose(-1, -2) / math.sqrt(queries.shape[-1])  # [B,H_q,T,T]
    t = queries.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool, device=queries.device).tril()
    allowed = causal[None, None] & mask[:, None, None, :]
    return scores.masked_fill(~allowed, -1e9).log_softmax(-1)


def attention_kl(
    queries: Tensor, student_keys: Tensor, target_keys: Tensor, mask: Tensor
) -> Tensor:
    """KL(attn_s ‖ attn_f) per real query position, averaged over query heads.

    Both distributions use the student's own queries: attn_s over the student's keys,
    attn_f over the fused teacher keys (in the student's RoPE frame). The student learns
    to attend as it would if its keys were the teachers'. -> scalar."""
    log_s = attention_logprobs(queries, student_keys, mask)
    log_f = attention_logprobs(queries, target_keys, mask)
    per_query = (log_s.exp() * (log_s - log_f)).sum(-1).mean(1)  # [B,T]
    return masked_mean(per_query, mask.bool().to(per_query.device))


def answer_token_nll(
    logits: Tensor, input_ids: Tensor, answer_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Next-token NLL of the answer tokens. logits [B,T,V], ids/mask [B,T] ->
    (nll [B,T-1], mask [B,T-1]); position t scores token t+1."""
    logp = logits[:, :-1].float().log_softmax(-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None].to(logits.device)).squeeze(-1)
    mask = answer_mask[:, 1:].to(logits.device).bool()
    return torch.where(mask, nll, torch.zeros_like(nll)), mask


def answer_ce(logits: Tensor, input_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """Token-mean cross-entropy on the teacher-forced answer. -> scalar."""
    nll, mask = answer_token_nll(logits, input_ids, answer_mask)
    return masked_mean(nll, mask)


def layer_weights(
    step: int,
    total_steps: int,
    num_layers: int,
    warmup_fraction: float = 0.3,
    shallow_fraction: float = 1 / 3,
) -> list[float]:
    """Layer-weight annealing: for the first `warmup_fraction` of steps only the shallowest
    ceil(shallow_fraction·L) layers are distilled (deep layers are harder to align, seed 002
    §3), then every layer with weight 1."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if step >= warmup_fraction * total_steps:
        return [1.0] * num_layers
    shallow = max(1, math.ceil(shallow_fraction * num_layers - 1e-9))
    return [1.0 if layer < shallow else 0.0 for layer in range(num_layers)]


@dataclass(frozen=True)
class LossWeights:
    """λK, λV, β, γ, δ (seed 002 §5 defaults: γ and δ start at 0)."""

    lambda_k: float = 1.0
    lambda_v: float = 1.0
    beta: float = 0.1
    gamma: float = 0.0
    delta: float = 0.0


def kv_layer_loss(
    student_k: Tensor,
    student_v: Tensor,
    target_k: Tensor,
    target_v: Tensor,
    mask: Tensor,
    weights: LossWeights,
    queries: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One layer's λK·MSE(K) + λV·MSE(V) + β·(1 − cos) + γ·attention-KL. Keys in the same
    RoPE frame on both sides. -> (scalar, detached terms)."""
    mse_k = kv_mse(student_k, target_k, mask)
    mse_v = kv_mse(student_v, target_v, mask)
    cos = 0.5 * (
        kv_cosine_distance(student_k, target_k, mask)
        + kv_cosine_distance(student_v, target_v, mask)
    )
    loss = weights.lambda_k * mse_k + weights.lambda_v * mse_v + weights.beta * cos
    terms = {"mse_k": mse_k.detach(), "mse_v": mse_v.detach(), "cos": cos.detach()}
    if weights.gamma > 0:
        if queries is None:
            raise ValueError("gamma > 0 needs the student's queries for the attention KL")
        kl = attention_kl(queries, student_k, target_k, mask)
        loss = loss + weights.gamma * kl
        terms["attn_kl"] = kl.detach()
    return loss, terms
