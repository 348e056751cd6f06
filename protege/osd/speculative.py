"""The speculative-sampling acceptance rule: pure functions on tensors.

A draft q proposed k tokens x_1..x_k; the target p scored the prefix and the k proposals in
one forward, giving p_1..p_{k+1}. Leviathan et al. 2023 / Chen et al. 2023: accept x_i with
probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection draw the replacement from
the residual norm(max(0, p_i − q_i)) and stop; when all k are accepted draw a bonus token
from p_{k+1}. Every emitted token is then distributed exactly as the target's next-token
distribution given the emitted prefix. Greedy decoding is the temperature-0 limit: accept
while the proposal is the target's argmax, and emit the target's argmax where it is not.
Shapes: K proposals, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Verdict:
    """The target's verdicts on one round of proposals per row. Each field is [B]."""

    accepted: Tensor  # long: leading proposals kept, 0..K
    next_token: Tensor  # long: the target's token after them (replacement or bonus)
    rejected: Tensor  # bool: a proposal was turned down (else `next_token` is the bonus)


def probabilities(logits: Tensor, temperature: float) -> Tensor:
    """Softmax of temperature-scaled logits in float64 (ratios p/q near 1 stay exact). [...,V]."""
    if temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature}")
    return torch.softmax(logits.double() / temperature, dim=-1)


def verify_greedy(proposals: Tensor, target_logits: Tensor) -> Verdict:
    """Greedy verdicts. proposals [B,K] long, target_logits [B,K+1,V]: the longest prefix of
    the proposals equal to the target's argmax, then the target's argmax after it."""
    choices = target_logits.argmax(-1)  # [B,K+1]
    k = proposals.shape[-1]
    accepted = (choices[:, :k] == proposals).long().cumprod(-1).sum(-1)
    next_token = choices.gather(-1, accepted[:, None]).squeeze(-1)
    return Verdict(accepted, next_token, accepted < k)


def verify_sampled(
    proposals: Tensor,
    draft_probs: Tensor,
    target_probs: Tensor,
    generator: torch.Generator | None = None,
) -> Verdict:
    """Rejection-sampling verdicts. proposals [B,K] long, draft_probs [B,K,V] (the
    distributions the proposals were drawn from), target_probs [B,K+1,V]."""
    rows, k = proposals.shape
    index = proposals.unsqueeze(-1)
    p_of_x = target_probs[:, :k].gather(-1, index).squeeze(-1)  # [B,K]
    q_of_x = draft_probs.gather(-1, index).squeeze(-1)
    uniforms = torch.rand(rows, k, generator=generator, dtype=torch.float64)
    # u < p/q written as u·q < p: no division, and q(x) > 0 for every drawn proposal.
    accepted = (uniforms * q_of_x < p_of_x).long().cumprod(-1).sum(-1)  # [B]
    row = torch.arange(rows)
    target_next = target_probs[row, accepted]  # [B,V]
    # After k accepted proposals the draft proposed nothing: q = 0 makes the residual p
    # itself, the bonus draw.
    draft_padded = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)
    residual = residual_distribution(target_next, draft_padded[row, accepted])
    next_token = torch.multinomial(residual.float(), 1, generator=generator).squeeze(-1)
    return Verdict(accepted, next_token, accepted < k)


def residual_distribution(target: Tensor, draft: Tensor) -> Tensor:
    """norm(max(0, p − q)) [...,V]. Where p ≤ q everywhere (p = q up to rounding) a
    rejection has probability ~0 and the residual is empty; p itself is then the right draw."""
    residual = (target - draft).clamp_min(0.0)
    total = residual.sum(-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp_min(1e-300), target)


def sample(probs: Tensor, generator: torch.Generator | None = None) -> int:
    """One token id drawn from `probs` [V]."""
    return int(torch.multinomial(probs.float(), 1, generator=generator))


def acceptance_probability(draft_probs: Tensor, target_probs: Tensor) -> Tensor:
    """Σ_v min(p(v), q(v)) [...]: the chance one proposal drawn from q is accepted
    (Leviathan et al. 2023, α = 1 − TV(p, q)). [...,V] -> [...]."""
    return torch.minimum(draft_probs, target_probs).sum(-1)
