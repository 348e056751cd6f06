"""Fusing several teachers' aligned KV into one target: KV_f = Σ_i α_i·KV_i (seed 002 §3).

Ways to get α (n teachers; weights sum to 1 over the last axis):
* fixed: given weights (v1);
* similarity routing: softmax of the cosine between the sample's early KV and each
  teacher's prototype (v2, not learned);
* learnable router: a small MLP on the student's hidden state, optionally one α per layer,
  with an entropy bonus against collapse onto one teacher (v3);
* attention fusion: per token, the student's queries score each teacher's keys (seed 004);
* task-conditional: a per-task weight table (seed 004).

Shapes: B batch, H kv-heads, H_q query heads, T tokens, D head_dim, n teachers, F features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def fuse(kvs: Sequence[Tensor], weights: Tensor) -> Tensor:
    """Σ_i α_i·kv_i. kvs: n × [B,H,T,D]; weights [B,n] (per sample) or [B,T,n] (per token)."""
    if weights.shape[-1] != len(kvs):
        raise ValueError(f"{weights.shape[-1]} weights for {len(kvs)} teachers")
    stacked = torch.stack(list(kvs), dim=-1)  # [B,H,T,D,n]
    if weights.dim() == 2:
        alpha = weights[:, None, None, None, :]
    elif weights.dim() == 3:
        alpha = weights[:, None, :, None, :]
    else:
        raise ValueError(f"weights must be [B,n] or [B,T,n], got {tuple(weights.shape)}")
    return (stacked * alpha.to(stacked.dtype)).sum(-1)


def fixed_weights(weights: Sequence[float], batch: int) -> Tensor:
    """The given weights, normalised, for every sample. -> [B,n]."""
    w = torch.tensor(list(weights), dtype=torch.float32)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"fixed weights must be >= 0 with a positive sum, got {list(weights)}")
    return (w / w.sum()).expand(batch, -1)


def entropy(weights: Tensor) -> Tensor:
    """Shannon entropy (nats) over the last axis. [...,n] -> [...]."""
    return -(weights * weights.clamp_min(1e-12).log()).sum(-1)


def pooled_features(keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens of [K ⧺ V], flattened over heads. [B,H,T,D] ×2, [B,T] -> [B,2HD]."""
    kv = torch.cat([keys, values], dim=-1)  # [B,H,T,2D]
    m = mask.to(kv.dtype)[:, None, :, None]
    pooled = (kv * m).sum(2) / m.sum(2).clamp_min(1.0)  # [B,H,2D]
    return pooled.flatten(1)


def similarity_weights(features: Tensor, prototypes: Tensor, temperature: float) -> Tensor:
    """softmax_i(cos(features, prototype_i) / temperature). [B,F], [n,F] -> [B,n]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    cos = torch.nn.functional.cosine_similarity(features[:, None, :], prototypes[None], dim=-1)
    return (cos / temperature).softmax(-1)


class PrototypeRouter(nn.Module):
    """Similarity routing (v2): each teacher's prototype is a running mean (momentum) of its
    projected layer-0 KV features; a sample is routed by the cosine of the student's own
    layer-0 KV features to each prototype. Not trained by gradients."""

    def __init__(
        self, num_teachers: int, features: int, temperature: float = 0.1, momentum: float = 0.9
    ):
        super().__init__()
        self.temperature, self.momentum = temperature, momentum
        self.register_buffer("prototypes", torch.zeros(num_teachers, features))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, teacher_features: Sequence[Tensor]) -> None:
        """teacher_features: n × [B,F]."""
        means = torch.stack([f.detach().float().mean(0) for f in teacher_features])
        if not bool(self.initialised):
            self.prototypes.copy_(means)
            self.initialised.fill_(True)
        else:
            self.prototypes.mul_(self.momentum).add_((1 - self.momentum) * means)

    def forward(self, student_features: Tensor) -> Tensor:
        """[B,F] -> [B,n]."""
        return similarity_weights(
            student_features.detach().float(), self.prototypes, self.temperature
        )


class LearnableRouter(nn.Module):
    """A small MLP on the student's mean-pooled last hidden state -> α over teachers, one set
    per student layer when `per_layer` ("shallow layers lean on A, deep on B"). The hidden
    state is detached: the router reads the student, it does not reshape it."""

    def __init__(
        self,
        hidden_size: int,
        num_teachers: int,
        num_layers: int,
        per_layer: bool = False,
        width: int = 32,
    ):
        super().__init__()
        self.num_teachers = num_teachers
        self.outputs = num_layers if per_layer else 1
        self.net = nn.Sequential(
            nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, self.outputs * num_teachers)
        )
        nn.init.zeros_(self.net[-1].weight)  # start uniform: no teacher is favoured a priori
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """hidden [B,T,hidden], mask [B,T] -> α [B,L_out,n] (L_out = layers or 1)."""
        m = mask.to(hidden.dtype)[..., None]
        pooled = (hidden.detach() * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.scores(pooled).softmax(-1)

    def scores(self, features: Tensor) -> Tensor:
        """The logits of α from already pooled features. [B,hidden] -> [B,L_out,n]."""
        return self.net(features).view(-1, self.outputs, self.num_teachers)


def attention_fusion_weights(
    queries: Tensor, teacher_keys: Sequence[Tensor], temperature: float = 1.0
) -> Tensor:
    """Per token, how strongly the student's query attends to each teacher's key at that
    token: softmax_i(mean over query heads of q·k_i/√D / temperature).
    queries [B,H_q,T,D], teacher_keys n × [B,H,T,D] (student frame) -> [B,T,n]."""
    heads_q = queries.shape[1]
    scores = []
    for keys in teacher_keys:
        keys = keys.repeat_interleave(heads_q // keys.shape[1], dim=1)
        scores.append((queries * keys).sum(-1).mean(1) / math.sqrt(queries.shape[-1]))  # [B,T]
    return (torch.stack(scores, -1) / temperature).softmax(-1)


def task_weight_table(nll: Tensor, temperature: float = 1.0) -> Tensor:
    """Task-conditional weights from each teacher's answer NLL on each task: teachers that
    are more confident on a task get more weight. nll [num_tasks,n] -> [num_tasks,n]."""
    return (-nll / temperature).softmax(-1)


def task_weights(task_ids: Tensor, table: Tensor) -> Tensor:
    """Row `task_ids[b]` of the table. [B], [num_tasks,n] -> [B,n]."""
    if int(task_ids.max()) >= table.shape[0]:
        raise ValueError(
            f"task id {int(task_ids.max())} but the weight table has {table.shape[0]} tasks"
        )
    return table.to(task_ids.device)[task_ids]
