"""Return and advantage estimators: pure tensor functions.

Shapes: B batch rows, T response tokens. Token-level inputs are right-padded with a
boolean mask; sequence-level rewards are [B].
"""

from __future__ import annotations

import torch
from torch import Tensor

from protege.algorithms.divergences import masked_mean


def future_returns(
    rewards: Tensor,
    mask: Tensor,
    gamma: float,
    length_normalise: bool,
    include_current: bool = False,
) -> Tensor:
    """MiniLLM's long-term return R_{t+1} = Σ_{i>t} γ^{i−t−1} r_i, optionally divided by
    the number of remaining tokens (MiniLLM §2.2: length normalisation, so short responses
    are not favoured). The current token's reward is excluded — the single-step term owns
    it; `include_current` gives R_t = Σ_{i≥t} γ^{i−t} r_i instead (no single-step term).
    Masked rewards count as 0. [B,T] -> [B,T]."""
    returns = discounted_returns(rewards, mask, gamma)  # Σ_{i≥t}
    remaining = mask.flip(-1).cumsum(-1).flip(-1).to(rewards.dtype)  # tokens from t on
    if not include_current:
        returns = torch.cat([returns[:, 1:], torch.zeros_like(returns[:, :1])], dim=-1)
        remaining = remaining - 1.0
    if length_normalise:
        returns = returns / remaining.clamp_min(1.0)
    return torch.where(mask.bool(), returns, torch.zeros_like(returns))


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = Σ_{i≥t} γ^{i−t} r_i over masked tokens. [B,T] -> [B,T]."""
    rewards = torch.where(mask.bool(), rewards, torch.zeros_like(rewards))
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean)/std over masked tokens; masked entries become 0. [B,T] -> [B,T]."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean).square(), mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def group_normalised(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """(r − mean of its group) / (std of its group + eps), as in GRPO. [B] -> [B]."""
    mean, std = _group_stats(rewards, group_ids)
    return (rewards - mean) / (std + eps)


def leave_one_out(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """RLOO: r minus the mean reward of the *other* samples of its prompt. [B] -> [B].
    Rows alone in their group get advantage 0 (no baseline to compare with)."""
    one_hot = _one_hot(group_ids, rewards.dtype)
    sums = one_hot @ (one_hot.T @ rewards)
    counts = one_hot @ one_hot.sum(0)
    others = (counts - 1).clamp_min(1.0)
    advantages = rewards - (sums - rewards) / others
    return torch.where(counts > 1, advantages, torch.zeros_like(advantages))


def _group_stats(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    one_hot = _one_hot(group_ids, values.dtype)
    counts = one_hot.sum(0)
    mean = (one_hot.T @ values) / counts
    var = (one_hot.T @ values.square()) / counts - mean.square()
    return one_hot @ mean, one_hot @ var.clamp_min(0.0).sqrt()


def _one_hot(group_ids: Tensor, dtype: torch.dtype) -> Tensor:
    _, index = torch.unique(group_ids, return_inverse=True)
    return torch.nn.functional.one_hot(index).to(dtype)  # [B,G]


def broadcast_to_tokens(per_row: Tensor, mask: Tensor) -> Tensor:
    """Sequence value on every real token. [B], [B,T] -> [B,T]."""
    return torch.where(mask.bool(), per_row.unsqueeze(-1).expand_as(mask).to(per_row.dtype), 0.0)
