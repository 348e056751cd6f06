"""Several teachers' outputs fused into one target, in the learner, before the loss (issue 14).

The fused target is a mixture in probability space, p = Σ_i w_i p_i, with per-token weights
w_i [B,T] that sum to 1 (`protege.fusion_config` says how they are chosen). It is written to
the batch's standard teacher fields, so every divergence and algorithm runs on it unchanged:

* full logits (also hidden states, decoded per teacher first): exact —
  `teacher_logits = τ·log Σ_i w_i softmax(z_i/τ)`, so the loss's own log_softmax(·/τ) gives
  the mixture of the teachers' tempered distributions;
* sampled log-probs: exact — log Σ_i w_i p_i(y_t);
* top-k + tail: the union of the teachers' top-k ids (and, to a common width M = min(V, nK),
  the most probable other ids) plus one tail bucket. Exact: every id in every teacher's
  top-k, the total mass (1), and everything when K = V. Not known to a payload is a
  teacher's mass on an id outside its own top-k: its exact tail mass is spread uniformly
  over its V − K other ids there (which never exceeds its smallest top-k probability);
* route: each row's tokens take its teacher's payload itself (a one-hot mixture, exact for
  every payload kind, no union).

Shapes: n teachers, B rows, T tokens, K top-k, V vocabulary, M fused top-k width.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from protege.algorithms.divergences import kl_from_logprobs, masked_sum
from protege.algorithms.teacher_view import paired_logprobs
from protege.errors import SetupError
from protege.fusion_config import FusionConfig
from protege.records import RolloutBatch
from protege.teacher_payload import TeacherPayload

# -- weights -----------------------------------------------------------------------------


def fixed_weights(weights: list[float], shape: torch.Size, device=None) -> Tensor:
    """[n] non-negative weights -> [n,B,T], normalised to sum to 1."""
    w = torch.tensor(weights, dtype=torch.float32, device=device)
    w = w / w.sum()
    return w.view(-1, *([1] * len(shape))).expand(-1, *shape).clone()


def route_weights(route: Tensor, count: int, width: int) -> Tensor:
    """[B] teacher index per row -> [n,B,T] one-hot weights."""
    one_hot = torch.nn.functional.one_hot(route.long(), count).float()  # [B,n]
    return one_hot.t().unsqueeze(-1).expand(-1, -1, width).clone()


def confidence_weights(entropies: Tensor, weights: list[float], temperature: float) -> Tensor:
    """[n,B,T] entropies -> [n,B,T] weights ∝ weight_i·exp(−H_i/temperature): the surer
    teacher weighs more; a teacher of weight 0 gets none."""
    prior = torch.tensor(weights, dtype=entropies.dtype, device=entropies.device)
    log_prior = torch.where(prior > 0, prior.log(), torch.full_like(prior, -math.inf))
    scores = log_prior.view(-1, 1, 1) - entropies / temperature
    return torch.softmax(scores, dim=0)


def entropy(logp: Tensor) -> Tensor:
    """H(p) over the last dim, 0·log 0 = 0. [...,S] log-probs -> [...]."""
    finite = logp > -math.inf
    return -torch.where(finite, logp.exp() * logp, torch.zeros_like(logp)).sum(-1)


# -- mixtures ----------------------------------------------------------------------------


def mix_logprobs(logps: Tensor, weights: Tensor) -> Tensor:
    """log Σ_i w_i p_i. [n,B,T,...] log-probs, [n,B,T] weights -> [B,T,...]."""
    log_w = torch.where(weights > 0, weights.log(), torch.full_like(weights, -math.inf))
    terms = logps + log_w.view(*log_w.shape, *([1] * (logps.dim() - log_w.dim())))
    empty = (terms == -math.inf).all(0)
    safe = torch.where(empty.unsqueeze(0), torch.zeros_like(terms), terms)
    return torch.where(empty, -math.inf, torch.logsumexp(safe, dim=0))


def fuse_full(logits: Tensor, weights: Tensor, temperature: float = 1.0) -> Tensor:
    """[n,B,T,V] teacher logits -> [B,T,V] logits whose softmax at `temperature` is the
    mixture of the teachers' softmaxes at it."""
    logps = torch.log_softmax(logits.float() / temperature, dim=-1)
    return temperature * mix_logprobs(logps, weights)


def fuse_topk(
    ids: Tensor, logps: Tensor, tails: Tensor, weights: Tensor, vocab: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k + tail payloads of n teachers -> one on the union of their supports.

    ids, logps [n,B,T,K]; tails [n,B,T]; weights [n,B,T]; `vocab` V, the ids the teachers'
    distributions cover -> ids, log-probs [B,T,M] and the fused tail [B,T], M = min(V, nK).
    See the module docstring for what is exact."""
    n, k = ids.shape[0], ids.shape[-1]
    spread = tails.exp() / (vocab - k) if vocab > k else torch.zeros_like(tails)
    dense = spread.unsqueeze(-1).expand(*tails.shape, vocab).clone()  # [n,B,T,V]
    dense.scatter_(-1, ids, logps.exp())
    fused = (weights.unsqueeze(-1) * dense).sum(0)  # [B,T,V]
    listed = torch.zeros_like(fused, dtype=torch.bool)
    for i in range(n):  # ids listed by a teacher that has weight on the token
        listed.scatter_(-1, ids[i], (weights[i] > 0).unsqueeze(-1).expand_as(ids[i]))
    width = min(vocab, n * k)
    order = listed.float() * 2.0 + fused  # listed ids first (fused <= 1), then by mass
    chosen = order.topk(width, dim=-1).indices
    kept = fused.gather(-1, chosen)
    tail = fused.scatter(-1, chosen, 0.0).sum(-1)
    return chosen, _log(kept), _log(tail)


def _log(mass: Tensor) -> Tensor:
    return torch.where(mass > 0, mass.clamp_min(1e-45).log(), torch.full_like(mass, -math.inf))


def route_payload(payloads: list[TeacherPayload], route: Tensor) -> dict[str, Tensor]:
    """Each row's fields taken from the teacher it names. [B] route -> standard fields."""
    out = {}
    for name, first in payloads[0].as_fields().items():
        if first is None:
            continue
        stacked = torch.stack([p.as_fields()[name] for p in payloads])  # [n,B,...]
        index = route.long().view(1, -1, *([1] * (stacked.dim() - 2)))
        out[name] = stacked.gather(0, index.expand(1, *stacked.shape[1:])).squeeze(0)
    return out


# -- the learner's step ------------------------------------------------------------------

Decoder = Callable[[str, Tensor, Tensor], Tensor]  # (teacher, hidden [B,T,d], mask) -> logits


def fuse_batch(
    batch: RolloutBatch,
    fusion: FusionConfig,
    weights: dict[str, float],
    temperature: float,
    vocab: int,
    decode: Decoder | None = None,
    mix: Tensor | None = None,
) -> tuple[RolloutBatch, Tensor, list[TeacherPayload]]:
    """(`batch` with the fused target in its standard fields and no named payloads, the
    [n,B,T] weights, the teachers' payloads with hidden states decoded into logits). `mix`:
    the [n,B,T] weights when the caller has them (fusion.mode=learned: the router's)."""
    names = list(batch.named_teachers)
    payloads = [_decoded(name, batch, decode) for name in names]
    mask = batch.response_mask.bool()
    if mix is None:
        mix = token_weights(batch, payloads, fusion, [weights[n] for n in names], temperature)
    if fusion.mode == "route":
        fields = route_payload(payloads, batch.teacher_route.to(mask.device))
        fields["teacher_hidden"] = None
    else:
        fields = _mixed_fields(payloads, mix, temperature, vocab)
    if "teacher_logprobs" in fields:
        fields["teacher_logprobs"] = torch.where(
            mask, fields["teacher_logprobs"], torch.zeros_like(fields["teacher_logprobs"])
        )
    return batch.replace(**fields, named_teachers={}), mix, payloads


def token_weights(
    batch: RolloutBatch,
    payloads: list[TeacherPayload],
    fusion: FusionConfig,
    weights: list[float],
    temperature: float,
) -> Tensor:
    """[n,B,T] weight of each teacher at each token."""
    shape = batch.response_mask.shape
    device = batch.response_mask.device
    if fusion.mode == "route":
        if batch.teacher_route is None:
            raise SetupError(
                f"fusion.mode=route, but the batch's rows carry no teacher: each training row "
                f"names its teacher in the field {fusion.field!r} (or set fusion.default)"
            )
        return route_weights(batch.teacher_route.to(device), len(payloads), shape[1])
    if fusion.mode == "fixed":
        return fixed_weights(weights, shape, device)
    if fusion.mode == "learned":
        raise ValueError("fusion.mode=learned: the weights are the learner's router's")
    entropies = torch.stack([entropy(_distribution(p, temperature)) for p in payloads])
    return confidence_weights(entropies, weights, fusion.temperature)


def _distribution(payload: TeacherPayload, temperature: float) -> Tensor:
    """The teacher's log-probs the payload carries: full [B,T,V], or top-k + tail [B,T,K+1]
    (whose entropy is a lower bound of the full one)."""
    if payload.logits is not None:
        return torch.log_softmax(payload.logits.float() / temperature, dim=-1)
    if payload.topk_logprobs is not None:
        return torch.cat([payload.topk_logprobs, payload.tail_logprobs.unsqueeze(-1)], -1)
    raise SetupError(
        "fusion.mode=confidence weighs teachers by the entropy of their distributions, but "
        "the algorithm asks them for sampled log-probs only; use fusion.mode=route or fixed"
    )


def _mixed_fields(
    payloads: list[TeacherPayload], mix: Tensor, temperature: float, vocab: int
) -> dict[str, Tensor | None]:
    fields: dict[str, Tensor | None] = {"teacher_hidden": None}
    if all(p.logprobs is not None for p in payloads):
        fields["teacher_logprobs"] = mix_logprobs(torch.stack([p.logprobs for p in payloads]), mix)
    if payloads[0].logits is not None:
        width = min(p.logits.shape[-1] for p in payloads)
        stacked = torch.stack([p.logits[..., :width] for p in payloads])
        fields["teacher_logits"] = fuse_full(stacked, mix, temperature)
    elif payloads[0].topk_ids is not None:
        ids, logps, tail = fuse_topk(
            torch.stack([p.topk_ids for p in payloads]),
            torch.stack([p.topk_logprobs for p in payloads]),
            torch.stack([p.tail_logprobs for p in payloads]),
            mix,
            vocab,
        )
        fields.update(teacher_topk_ids=ids, teacher_topk_logprobs=logps, teacher_tail_logprobs=tail)
    return fields


def _decoded(name: str, batch: RolloutBatch, decode: Decoder | None) -> TeacherPayload:
    payload = batch.named_teachers[name]
    if payload.hidden is None:
        return payload
    if decode is None:
        raise ValueError(f"teacher {name!r} sent hidden states, but no head decodes them")
    logits = decode(name, payload.hidden, batch.response_mask.bool())
    return TeacherPayload(logprobs=payload.logprobs, logits=logits)


def teacher_metrics(
    student_logits: Tensor,
    batch: RolloutBatch,
    names: list[str],
    payloads: list[TeacherPayload],
    mix: Tensor,
    temperature: float,
) -> dict[str, float]:
    """Per teacher: the student's KL(q‖p_i) per token (over the payload's support) and its
    share of the target (the tokens routed to it, or its mean weight), both summed over
    tokens and divided by the batch's normaliser, so micro-batches and ranks add up."""
    mask = batch.response_mask.bool()
    count = batch.normaliser() or 1.0
    out = {}
    with torch.no_grad():
        logits = student_logits.detach()
        for i, (name, payload) in enumerate(zip(names, payloads)):
            view = batch.replace(**payload.as_fields())
            if payload.logits is not None or payload.topk_ids is not None:
                student_logp, teacher_logp = paired_logprobs(logits, view, temperature)
                kl = kl_from_logprobs(student_logp, teacher_logp)
                out[f"teacher/{name}/reverse_kl"] = float(masked_sum(kl, mask)) / count
            out[f"teacher/{name}/share"] = float(masked_sum(mix[i], mask)) / count
    return out


def driver_logprobs(batch: RolloutBatch, config, temperature: float) -> RolloutBatch:
    """At the controller, before `advantages`: the fused log p(y_t) of the sampled tokens in
    `teacher_logprobs` (MiniLLM, OPD and RL+distill read it there). The named payloads stay
    for the learner, which fuses them all. Left out (None) only for confidence weights over
    hidden states, which only the learner can decode, and for learned weights (the learner's
    router; `protege.fusion_config.router_problem` refuses algorithms that would need them)."""
    payloads = list(batch.named_teachers.values())
    if not payloads or any(p.logprobs is None for p in payloads):
        return batch
    if config.fusion.mode == "confidence" and any(p.hidden is not None for p in payloads):
        return batch
    if config.fusion.mode == "learned":  # the router lives in the learner
        return batch
    weights = [spec.weight for spec in config.teachers]
    mix = token_weights(batch, payloads, config.fusion, weights, temperature)
    fused = mix_logprobs(torch.stack([p.logprobs for p in payloads]), mix)
    mask = batch.response_mask.bool()
    return batch.replace(teacher_logprobs=torch.where(mask, fused, torch.zeros_like(fused)))
