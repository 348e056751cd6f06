"""Head and head-dim projection of teacher K/V into the student's KV shape.

Shapes: B batch, T time; teacher K/V [B,H_t,T,D_t] -> student [B,H_s,T,D_s]. H counts are
key/value heads (`num_key_value_heads`), never query heads: under GQA/MQA the two differ,
and mixing them up is the shape bug the seed lost days to.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

ProjectorKind = Literal["linear", "bottleneck"]


def kv_heads_and_dim(config: Any) -> tuple[int, int]:
    """(num_key_value_heads, head_dim) of a HF config — the shape of its KV cache."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(heads), int(head_dim)


def head_mixing_init(teacher_heads: int, student_heads: int) -> Tensor:
    """Grouped averaging of teacher heads into student heads. -> float32 [H_s,H_t], rows sum to 1.

    Student head s covers the slice [s·H_t/H_s, (s+1)·H_t/H_s) of the teacher's heads and
    weights each teacher head by its overlap with that slice. If H_s divides H_t this is the
    plain mean of a contiguous group (12→2: heads 0–5 and 6–11); if H_t is not a multiple,
    boundary heads are shared fractionally; if H_s > H_t, teacher heads are replicated.
    Contiguous groups match how GQA shares one KV head among neighbouring query heads.
    """
    if teacher_heads < 1 or student_heads < 1:
        raise ValueError(
            f"head counts must be >= 1, got teacher_heads={teacher_heads}, "
            f"student_heads={student_heads}"
        )
    # In units of 1/(H_t·H_s): student s spans [s·H_t, (s+1)·H_t), teacher t [t·H_s, (t+1)·H_s).
    student_start = torch.arange(student_heads)[:, None] * teacher_heads
    teacher_start = torch.arange(teacher_heads)[None, :] * student_heads
    overlap = torch.minimum(student_start + teacher_heads, teacher_start + student_heads)
    overlap = (overlap - torch.maximum(student_start, teacher_start)).clamp(min=0)
    return overlap.float() / teacher_heads


def _rope_pair_identity(teacher_dim: int, student_dim: int) -> Tensor:
    """[D_s,D_t] 0/1 matrix copying rotary pairs: in HF's rotate_half layout feature i pairs
    with i + D/2, so the first min(D)/2 pairs of both halves are copied. Identity when equal."""
    if teacher_dim % 2 or student_dim % 2:
        return torch.eye(student_dim, teacher_dim)
    weight = torch.zeros(student_dim, teacher_dim)
    pairs = min(teacher_dim, student_dim) // 2
    index = torch.arange(pairs)
    weight[index, index] = 1.0
    weight[student_dim // 2 + index, teacher_dim // 2 + index] = 1.0
    return weight


class KVProjector(nn.Module):
    """Learnable head mixing (initialised to grouped averaging) followed by a head-dim map.

    kind="linear": one Linear D_t→D_s, initialised to copy rotary pairs (exactly the
    identity when D_t == D_s, so a same-shape projector starts as a no-op).
    kind="bottleneck": the seed's elastic bottleneck LayerNorm → Linear(D_t, round(mlp_ratio·D_s))
    → SiLU → Dropout → Linear(→ D_s), for teachers a linear map cannot fit.
    """

    def __init__(
        self,
        teacher_heads: int,
        teacher_dim: int,
        student_heads: int,
        student_dim: int,
        kind: ProjectorKind = "linear",
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if min(teacher_heads, teacher_dim, student_heads, student_dim) < 1:
            raise ValueError(
                f"head counts and dims must be >= 1, got teacher ({teacher_heads}, {teacher_dim}), "
                f"student ({student_heads}, {student_dim})"
            )
        self.teacher_heads, self.teacher_dim = teacher_heads, teacher_dim
        self.student_heads, self.student_dim = student_heads, student_dim
        self.head_mix = nn.Parameter(head_mixing_init(teacher_heads, student_heads))  # [H_s,H_t]
        self.dim_proj = self._build_dim_proj(kind, mlp_ratio, dropout)

    def _build_dim_proj(self, kind: str, mlp_ratio: float, dropout: float) -> nn.Module:
        if kind == "linear":
            linear = nn.Linear(self.teacher_dim, self.student_dim)
            with torch.no_grad():
                linear.weight.copy_(_rope_pair_identity(self.teacher_dim, self.student_dim))
                linear.bias.zero_()
            return linear
        if kind == "bottleneck":
            if mlp_ratio <= 0:
                raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
            if not 0.0 <= dropout < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {dropout}")
            hidden = max(1, round(mlp_ratio * self.student_dim))
            return nn.Sequential(
                nn.LayerNorm(self.teacher_dim),
                nn.Linear(self.teacher_dim, hidden),
                nn.SiLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, self.student_dim),
            )
        raise ValueError(f"kind must be 'linear' or 'bottleneck', got {kind!r}")

    @classmethod
    def from_configs(cls, teacher_config: Any, student_config: Any, **kwargs: Any) -> KVProjector:
        """Projector between two HF configs' KV shapes (num_key_value_heads, head_dim)."""
        return cls(*kv_heads_and_dim(teacher_config), *kv_heads_and_dim(student_config), **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """[B,H_t,T,D_t] -> [B,H_s,T,D_s]."""
        expected = f"[B, H_t={self.teacher_heads}, T, D_t={self.teacher_dim}]"
        if x.dim() != 4:
            raise ValueError(f"expected teacher K/V of shape {expected}, got {tuple(x.shape)}")
        if x.shape[1] != self.teacher_heads or x.shape[3] != self.teacher_dim:
            raise ValueError(
                f"expected teacher K/V of shape {expected}, got {tuple(x.shape)}; heads are "
                "num_key_value_heads (not num_attention_heads) and D is head_dim"
            )
        mixed = torch.einsum("st,btnd->bsnd", self.head_mix.to(x.dtype), x)
        return self.dim_proj(mixed)
