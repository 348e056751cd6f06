"""Rotary position embeddings in HF's layout, and moving keys between two models' RoPE frames.

HF decoders (Llama, Qwen2, …) cache keys *after* RoPE, in the rotate_half layout: feature
i is rotated together with feature i + R/2 by angle position·inv_freq[i], over the first
R = head_dim·partial features (the rest pass through). Values carry no rotation. A teacher's
cached keys are therefore in the teacher's rotary frame; before a student can match them
they are moved to the student's: `reframe_keys` when head dims agree, otherwise undo the
teacher's rotation, project (`KVProjector`), then apply the student's:

    k = apply_rope(projector(undo_rope(k_teacher, pos, teacher_spec)), pos, student_spec)

Shapes: B batch, H heads, T time, D head_dim; positions are [B,T] or [T].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

_SCALINGS = (None, "linear", "ntk")
# HF rope_type -> our scaling. HF has no static NTK type ("ntk" is for specs built by hand);
# yarn, llama3, longrope and dynamic change frequencies per band or with the sequence
# length and are refused rather than silently approximated.
_HF_ROPE_TYPES = {"default": None, "linear": "linear"}


@dataclass(frozen=True)
class RopeSpec:
    """A model's rotary embedding. theta: base; head_dim: D; scaling: None, "linear"
    (positions divided by factor) or "ntk" (static NTK-aware: base multiplied by
    factor^(R/(R−2))); partial: fraction of head_dim that is rotated."""

    theta: float
    head_dim: int
    scaling: str | None = None
    factor: float = 1.0
    partial: float = 1.0

    def __post_init__(self) -> None:
        if self.theta <= 0:
            raise ValueError(f"theta must be > 0, got {self.theta}")
        if self.scaling not in _SCALINGS:
            raise ValueError(f"scaling must be one of {_SCALINGS}, got {self.scaling!r}")
        if self.factor <= 0:
            raise ValueError(f"factor must be > 0, got {self.factor}")
        if not 0.0 < self.partial <= 1.0:
            raise ValueError(f"partial must be in (0, 1], got {self.partial}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(
                f"rotated width int(head_dim·partial) = {self.rotary_dim} must be even and >= 2 "
                f"(head_dim={self.head_dim}, partial={self.partial})"
            )

    @property
    def rotary_dim(self) -> int:
        """R: how many leading features of each head are rotated (HF: int(head_dim·partial))."""
        return int(self.head_dim * self.partial)

    @classmethod
    def from_config(cls, config: Any, layer_type: str | None = None) -> RopeSpec:
        """Read a HF config, in the transformers ≥ 5 layout (`config.rope_parameters`, a dict
        with rope_theta, rope_type, factor, partial_rotary_factor — or one such dict per
        layer type, pick one with `layer_type`) or the older one (`config.rope_theta` plus a
        `config.rope_scaling` dict keyed "type" or "rope_type")."""
        params = dict(getattr(config, "rope_parameters", None) or {})
        if params and all(isinstance(v, dict) for v in params.values()):
            if layer_type not in params:
                raise ValueError(
                    f"config has per-layer-type rope parameters {sorted(params)}; pass layer_type"
                )
            params = dict(params[layer_type])
        legacy = dict(getattr(config, "rope_scaling", None) or {})
        params = {**legacy, **params}
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
        if theta is None:
            raise ValueError(
                "config has no rope_theta (neither in rope_parameters nor as attribute)"
            )
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in _HF_ROPE_TYPES:
            raise ValueError(
                f"rope_type {rope_type!r} is not supported; supported: {sorted(_HF_ROPE_TYPES)}"
            )
        scaling = _HF_ROPE_TYPES[rope_type]
        partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        factor = float(params.get("factor", 1.0)) if scaling else 1.0
        return cls(float(theta), int(head_dim), scaling, factor, float(partial or 1.0))


def inverse_frequencies(spec: RopeSpec) -> Tensor:
    """Per-pair angular frequencies, float32 [R/2], computed as HF does."""
    dim = spec.rotary_dim
    base = spec.theta
    if spec.scaling == "ntk":
        base = base * spec.factor ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base**exponents)
    return inv_freq / spec.factor if spec.scaling == "linear" else inv_freq


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(x: Tensor, positions: Tensor, spec: RopeSpec, sign: float) -> Tensor:
    """Rotate x [B,H,T,D] by sign·position·inv_freq in HF's layout; float32 (float64 for
    float64 input) whatever x's dtype, as HF computes cos/sin."""
    if x.dim() != 4 or x.shape[-1] != spec.head_dim:
        raise ValueError(f"x must be [B,H,T,D={spec.head_dim}], got {tuple(x.shape)}")
    if positions.dim() not in (1, 2) or positions.shape[-1] != x.shape[2]:
        raise ValueError(
            f"positions must be [T] or [B,T] with T={x.shape[2]}, got {tuple(positions.shape)}"
        )
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = inverse_frequencies(spec).to(x.device, dtype)
    angles = positions.to(x.device, dtype)[..., None] * inv_freq  # [(B,)T,R/2]
    angles = torch.cat((angles, angles), dim=-1)
    angles = angles[:, None] if positions.dim() == 2 else angles[None, None]  # [B|1,1,T,R]
    cos, sin = angles.cos(), sign * angles.sin()
    rotated, passed = x[..., : spec.rotary_dim].to(dtype), x[..., spec.rotary_dim :]
    rotated = rotated * cos + _rotate_half(rotated) * sin
    return torch.cat((rotated.to(x.dtype), passed), dim=-1)


def apply_rope(x: Tensor, positions: Tensor, spec: RopeSpec) -> Tensor:
    """Rotate pre-RoPE keys (or queries) into `spec`'s frame. [B,H,T,D] -> [B,H,T,D]."""
    return _rotate(x, positions, spec, 1.0)


def undo_rope(x: Tensor, positions: Tensor, spec: RopeSpec) -> Tensor:
    """Exact inverse of `apply_rope` (rotation by the negative angle). [B,H,T,D] -> [B,H,T,D]."""
    return _rotate(x, positions, spec, -1.0)


def reframe_keys(k: Tensor, positions: Tensor, teacher: RopeSpec, student: RopeSpec) -> Tensor:
    """Move cached keys from the teacher's rotary frame to the student's. [B,H,T,D].

    Needs equal head dims; when they differ, undo the teacher's rotation, project, then
    apply the student's (see the module docstring).
    """
    if teacher.head_dim != student.head_dim:
        raise ValueError(
            f"reframe_keys needs equal head dims, got teacher {teacher.head_dim} and student "
            f"{student.head_dim}: use undo_rope(teacher) -> project -> apply_rope(student)"
        )
    if teacher == student:
        return k
    return apply_rope(undo_rope(k, positions, teacher), positions, student)
