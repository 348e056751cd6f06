"""Fusion of teachers' KV: brute-force weighted sums, routing, and the router's entropy term."""

from __future__ import annotations

import math

import pytest
import torch

from protege.kv.fusion import (
    LearnableRouter,
    PrototypeRouter,
    attention_fusion_weights,
    entropy,
    fixed_weights,
    fuse,
    pooled_features,
    similarity_weights,
    task_weight_table,
    task_weights,
)
from protege.kv.loss import kv_mse

B, H, T, D = 4, 2, 5, 8


def _kv(seed: int) -> torch.Tensor:
    return torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(seed))


def test_fuse_per_sample_and_per_token_match_loops():
    kvs = [_kv(0), _kv(1), _kv(2)]
    w = torch.rand(B, 3).softmax(-1)
    out = fuse(kvs, w)
    for b in range(B):
        assert torch.allclose(out[b], sum(w[b, i] * kvs[i][b] for i in range(3)), atol=1e-6)
    wt = torch.rand(B, T, 3).softmax(-1)
    out = fuse(kvs, wt)
    for b in range(B):
        for t in range(T):
            assert torch.allclose(
                out[b, :, t], sum(wt[b, t, i] * kvs[i][b, :, t] for i in range(3)), atol=1e-6
            )
    with pytest.raises(ValueError, match="2 weights for 3 teachers"):
        fuse(kvs, torch.ones(B, 2))


def test_fixed_weights_normalised_and_validated():
    assert torch.allclose(fixed_weights([0.7, 0.3], 2), torch.tensor([[0.7, 0.3], [0.7, 0.3]]))
    assert torch.allclose(fixed_weights([2, 2], 1), torch.tensor([[0.5, 0.5]]))
    with pytest.raises(ValueError):
        fixed_weights([0.0, 0.0], 1)


def test_similarity_routing_prefers_the_closer_prototype():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = similarity_weights(torch.tensor([[2.0, 0.1], [0.0, -1.0]]), prototypes, temperature=0.1)
    assert w[0, 0] > 0.99 and w[1, 0] > 0.5  # [0,-1]: cos 0 vs -1
    router = PrototypeRouter(2, 2, temperature=0.1, momentum=0.5)
    router.update([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])])
    assert torch.allclose(router.prototypes, prototypes)
    router.update([torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]])])
    assert torch.allclose(router.prototypes[0], torch.tensor([0.5, 0.5]))


def test_pooled_features_ignore_padding():
    k, v = _kv(0), _kv(1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 3:] = 1e6
    assert torch.allclose(pooled_features(k, v, mask), pooled_features(k2, v2, mask))
    assert torch.allclose(pooled_features(k, v, mask)[0, :D], k[0, 0, :3].mean(0))


def test_attention_fusion_weights_brute_force():
    torch.manual_seed(0)
    q = torch.randn(B, 4, T, D)  # 4 query heads over 2 KV heads
    keys = [_kv(3), _kv(4)]
    w = attention_fusion_weights(q, keys, temperature=2.0)
    b, t = 1, 3
    scores = [
        sum(q[b, h, t] @ k[b, h // 2, t] for h in range(4)) / 4 / math.sqrt(D) / 2.0 for k in keys
    ]
    assert torch.allclose(w[b, t], torch.stack(scores).softmax(0), atol=1e-6)


def test_task_weights():
    table = task_weight_table(torch.tensor([[0.1, 2.0], [2.0, 0.1]]), temperature=1.0)
    assert table[0, 0] > 0.8 and table[1, 1] > 0.8
    assert torch.allclose(task_weights(torch.tensor([1, 0]), table), table[[1, 0]])
    with pytest.raises(ValueError, match="task id"):
        task_weights(torch.tensor([2]), table)


def _train_router(entropy_weight: float) -> torch.Tensor:
    """Two-teacher toy: teacher 0 is exactly the student's KV, teacher 1 is noise; the
    router minimises MSE(student, fused) − entropy_weight·H(α). Returns the final α [B,n]."""
    torch.manual_seed(0)
    student, teacher_0, teacher_1 = _kv(0), _kv(0), _kv(1)
    hidden, mask = torch.randn(B, T, 16), torch.ones(B, T, dtype=torch.bool)
    router = LearnableRouter(16, 2, num_layers=1)
    optimizer = torch.optim.Adam(router.parameters(), lr=0.05)
    for _ in range(300):
        alpha = router(hidden, mask)[:, 0]
        loss = (
            kv_mse(student, fuse([teacher_0, teacher_1], alpha), mask)
            - entropy_weight * entropy(alpha).mean()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return router(hidden, mask)[:, 0].detach()


def test_router_entropy_term_prevents_collapse():
    collapsed = _train_router(entropy_weight=0.0)
    assert collapsed[:, 1].max() < 0.05  # all weight on the easy teacher
    kept = _train_router(entropy_weight=1.0)
    assert kept.min() > 0.2  # both teachers keep a real share
    assert kept[:, 0].min() > kept[:, 1].max()  # still prefers the better teacher


def test_router_starts_uniform_and_can_be_per_layer():
    router = LearnableRouter(8, 3, num_layers=2, per_layer=True)
    alpha = router(torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool))
    assert alpha.shape == (2, 2, 3)
    assert torch.allclose(alpha, torch.full_like(alpha, 1 / 3))
