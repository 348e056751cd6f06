"""KV-distillation loss terms: brute-force definitions, masking, edge cases, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from protege.kv.loss import (
    LossWeights,
    answer_ce,
    attention_kl,
    attention_logprobs,
    kv_cosine_distance,
    kv_layer_loss,
    kv_mse,
    layer_weights,
    masked_mean,
)

B, H, HQ, T, D = 3, 2, 4, 5, 8


def _kv(seed: int) -> torch.Tensor:
    return torch.randn(
        B, H, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)


def test_mse_and_cosine_match_loops():
    s, t = _kv(0), _kv(1)
    errors, distances = [], []
    for b in range(B):
        for i in range(T):
            if MASK[b, i]:
                errors.append(((s[b, :, i] - t[b, :, i]) ** 2).mean().item())
                cos = [
                    (s[b, h, i] @ t[b, h, i] / (s[b, h, i].norm() * t[b, h, i].norm())).item()
                    for h in range(H)
                ]
                distances.append(1 - sum(cos) / H)
    assert kv_mse(s, t, MASK).item() == pytest.approx(sum(errors) / len(errors), rel=1e-10)
    assert kv_cosine_distance(s, t, MASK).item() == pytest.approx(
        sum(distances) / len(distances), rel=1e-10
    )


def test_all_masked_gives_zero_not_nan():
    s, t = _kv(0), _kv(1)
    empty = torch.zeros(B, T, dtype=torch.bool)
    assert kv_mse(s, t, empty).item() == 0.0
    assert kv_cosine_distance(s, t, empty).item() == 0.0
    q = torch.randn(B, HQ, T, D, dtype=torch.float64)
    assert attention_kl(q, s, t, empty).item() == 0.0
    assert masked_mean(torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0


def test_padding_never_contributes_to_any_term():
    """Garbage (even NaN) in padded slots changes neither the loss nor its gradient."""
    s, t = _kv(0).requires_grad_(), _kv(1)
    q = torch.randn(B, HQ, T, D, dtype=torch.float64, requires_grad=True)
    weights = LossWeights(lambda_k=1.0, lambda_v=0.5, beta=0.3, gamma=0.7)
    loss, _ = kv_layer_loss(s, s * 2, t, t * 3, MASK, weights, q)
    grad_s, grad_q = torch.autograd.grad(loss, [s, q])

    pad = ~MASK[:, None, :, None]
    s2 = torch.where(pad, torch.full_like(s, float("nan")), s.detach()).requires_grad_()
    t2 = torch.where(pad, torch.full_like(t, 1e6), t)
    q2 = torch.where(~MASK[:, None, :, None], torch.full_like(q, 5.0), q.detach()).requires_grad_()
    loss2, _ = kv_layer_loss(s2, s2 * 2, t2, t2 * 3, MASK, weights, q2)
    grad_s2, grad_q2 = torch.autograd.grad(loss2, [s2, q2])
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)
    assert torch.allclose(torch.where(pad, 0.0, grad_s2), torch.where(pad, 0.0, grad_s))
    assert torch.equal(torch.where(pad, 0.0, grad_s2).isnan().any(), torch.tensor(False))
    assert torch.allclose(
        grad_q2[~pad.expand_as(q2)[:, :1].expand_as(q2)],
        grad_q[~pad.expand_as(q2)[:, :1].expand_as(q2)],
    )


def test_answer_ce_ignores_prompt_and_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    answer = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    expected = [
        -logits[0, 1].log_softmax(-1)[3],
        -logits[0, 2].log_softmax(-1)[0],
        -logits[1, 0].log_softmax(-1)[5],
    ]
    assert answer_ce(logits, ids, answer).item() == pytest.approx(
        sum(e.item() for e in expected) / 3
    )
    garbage = logits.clone()
    garbage[1, 2:] = float("nan")  # only the pad positions of row 1
    assert answer_ce(garbage, ids, answer).item() == pytest.approx(
        answer_ce(logits, ids, answer).item()
    )


def test_attention_kl_brute_force_and_identity():
    torch.manual_seed(0)
    q, ks, kf = torch.randn(B, HQ, T, D, dtype=torch.float64), _kv(2), _kv(3)
    total, count = 0.0, 0
    for b in range(B):
        valid = [j for j in range(T) if MASK[b, j]]
        for i in valid:
            keys = [j for j in valid if j <= i]
            per_head = []
            for h in range(HQ):
                kh = h // (HQ // H)
                p = torch.softmax(
                    torch.stack([q[b, h, i] @ ks[b, kh, j] for j in keys]) / math.sqrt(D), 0
                )
                r = torch.softmax(
                    torch.stack([q[b, h, i] @ kf[b, kh, j] for j in keys]) / math.sqrt(D), 0
                )
                per_head.append((p * (p / r).log()).sum().item())
            total, count = total + sum(per_head) / HQ, count + 1
    assert attention_kl(q, ks, kf, MASK).item() == pytest.approx(total / count, rel=1e-9)
    assert attention_kl(q, ks, ks, MASK).item() == pytest.approx(0.0, abs=1e-12)
    probs = attention_logprobs(q, ks, MASK).exp()
    assert probs[0, 0, 1, 2].item() == 0.0  # causal
    assert probs[1, 0, 2, 3].item() == 0.0  # padding key


def test_loss_terms_gradcheck():
    s, t = _kv(0)[:1, :, :3, :3].requires_grad_(), _kv(1)[:1, :, :3, :3]
    q = torch.randn(1, HQ, 3, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    weights = LossWeights(beta=0.5, gamma=0.5)
    assert torch.autograd.gradcheck(
        lambda a, b: kv_layer_loss(a, a, t, t, mask, weights, b)[0], (s, q)
    )


def test_gamma_needs_queries():
    with pytest.raises(ValueError, match="queries"):
        kv_layer_loss(_kv(0), _kv(0), _kv(1), _kv(1), MASK, LossWeights(gamma=0.1))


def test_layer_weight_annealing():
    # first 30% of 100 steps: only the shallow third of 6 layers
    assert layer_weights(0, 100, 6) == [1, 1, 0, 0, 0, 0]
    assert layer_weights(29, 100, 6) == [1, 1, 0, 0, 0, 0]
    assert layer_weights(30, 100, 6) == [1] * 6
    assert layer_weights(0, 100, 2) == [1, 0]  # at least one layer
    assert layer_weights(0, 100, 3, warmup_fraction=0.0) == [1, 1, 1]
    with pytest.raises(ValueError):
        layer_weights(0, 10, 0)
