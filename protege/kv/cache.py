"""Per-layer key/value caches as records carry them (`RolloutBatch.teacher_kv`).

A `LayerKV` holds L × [B,H,S,D] keys and values on one time axis. On a rollout batch the
axis is the student's sequence layout S = P + T (prompt left-padded, response right-padded:
padding sits in the middle), so selecting rows is plain indexing and concatenating shards
pads the prompt part on the left and the response part on the right, like the token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LayerKV:
    """Keys and values of every layer on one time axis (CPU or device tensors)."""

    keys: tuple[Tensor, ...]  # L × [B,H_kv,T,D]
    values: tuple[Tensor, ...]  # L × [B,H_kv,T,D]

    def select(self, index: Tensor | slice) -> LayerKV:
        return LayerKV(tuple(k[index] for k in self.keys), tuple(v[index] for v in self.values))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


KV_PREFIX = "teacher_kv."


def flatten_kv(kvs: tuple[LayerKV, ...]) -> dict[str, Tensor]:
    """Named tensors `teacher_kv.{teacher}.{k|v}.{layer}` (for the packed wire format)."""
    out = {}
    for i, kv in enumerate(kvs):
        for j, (k, v) in enumerate(zip(kv.keys, kv.values)):
            out[f"{KV_PREFIX}{i}.k.{j}"], out[f"{KV_PREFIX}{i}.v.{j}"] = k, v
    return out


def unflatten_kv(tensors: dict[str, Tensor]) -> tuple[LayerKV, ...] | None:
    """Inverse of `flatten_kv` (None when there are no KV tensors)."""
    found: dict[int, dict[str, dict[int, Tensor]]] = {}
    for name, tensor in tensors.items():
        teacher, kind, layer = name[len(KV_PREFIX) :].split(".")
        found.setdefault(int(teacher), {"k": {}, "v": {}})[kind][int(layer)] = tensor
    if not found:
        return None
    return tuple(
        LayerKV(
            tuple(found[i]["k"][j] for j in sorted(found[i]["k"])),
            tuple(found[i]["v"][j] for j in sorted(found[i]["v"])),
        )
        for i in sorted(found)
    )


def concat_kv(parts: list[tuple[LayerKV, ...]], prompt_lengths: list[int]) -> tuple[LayerKV, ...]:
    """Row-wise concatenation of shards' KV, each [b,H,P_i+T_i,D] with P_i = prompt_lengths[i]:
    prompts left-padded to the longest P, responses right-padded to the longest T."""
    if len({len(p) for p in parts}) != 1:
        raise ValueError("cannot concatenate batches with different numbers of KV teachers")
    width_p = max(prompt_lengths)
    width_t = max(p[0].keys[0].shape[2] - n for p, n in zip(parts, prompt_lengths))

    def pad(x: Tensor, prompt: int) -> Tensor:
        before, after = width_p - prompt, width_t - (x.shape[2] - prompt)
        return torch.nn.functional.pad(x, (0, 0, before, after))

    def cat(tensors: list[Tensor]) -> Tensor:
        return torch.cat([pad(t, n) for t, n in zip(tensors, prompt_lengths)], dim=0)

    return tuple(
        LayerKV(
            tuple(cat([p[i].keys[j] for p in parts]) for j in range(len(parts[0][i].keys))),
            tuple(cat([p[i].values[j] for p in parts]) for j in range(len(parts[0][i].values))),
        )
        for i in range(len(parts[0]))
    )
