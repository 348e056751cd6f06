"""One teacher's outputs kept under its name, so several teachers can travel in one batch.

With one teacher, its outputs live in `RolloutBatch`'s standard fields (`teacher_logprobs`,
`teacher_topk_*`, `teacher_tail_logprobs`, `teacher_logits`, `teacher_hidden`), which every
algorithm reads. With several, each scorer files its outputs under its name instead
(`RolloutPlan.store_as`, set by `protege.teachers.scoring_plan`), and the learner fuses them
into the standard fields micro-batch by micro-batch (`protege.fusion`). This module imports
nothing of protege so `protege.records` can hold the payloads.

Shapes: B rows, T response tokens, K top-k, V vocabulary, d teacher hidden size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

# RolloutBatch field -> TeacherPayload field
STANDARD_FIELDS = {
    "teacher_logprobs": "logprobs",
    "teacher_topk_ids": "topk_ids",
    "teacher_topk_logprobs": "topk_logprobs",
    "teacher_tail_logprobs": "tail_logprobs",
    "teacher_logits": "logits",
    "teacher_hidden": "hidden",
}
NAMED_PREFIX = "named_teacher."  # wire-format keys: named_teacher.{index}.{field}


@dataclass(frozen=True)
class TeacherPayload:
    """What one teacher scored for a batch (the same meanings as RolloutBatch's fields)."""

    logprobs: Tensor | None = None  # [B,T] log p_i(y_t) at temperature 1, 0 where masked
    topk_ids: Tensor | None = None  # [B,T,K] long
    topk_logprobs: Tensor | None = None  # [B,T,K] at the plan's temperature
    tail_logprobs: Tensor | None = None  # [B,T] exact log mass outside the top-k
    logits: Tensor | None = None  # [B,T,V] float32, untempered
    hidden: Tensor | None = None  # [B,T,d] the input of the teacher's output head

    @classmethod
    def from_fields(cls, fields: dict[str, Tensor]) -> TeacherPayload:
        """From scorer outputs named as RolloutBatch's standard fields."""
        unknown = set(fields) - set(STANDARD_FIELDS)
        if unknown:
            raise ValueError(f"not teacher outputs: {sorted(unknown)}")
        return cls(**{STANDARD_FIELDS[name]: value for name, value in fields.items()})

    def as_fields(self) -> dict[str, Tensor | None]:
        """The standard RolloutBatch fields holding this payload (absent ones as None)."""
        return {name: getattr(self, short) for name, short in STANDARD_FIELDS.items()}

    def tensors(self) -> dict[str, Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    def map(self, change) -> TeacherPayload:
        """Every present tensor passed through `change` (row selection, device moves)."""
        return dataclasses.replace(self, **{k: change(v) for k, v in self.tensors().items()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


Named = dict[str, TeacherPayload]


def flatten_named(named: Named) -> tuple[list[str], dict[str, Tensor]]:
    """(teacher names in order, tensors keyed named_teacher.{index}.{field}) for packing."""
    tensors = {
        f"{NAMED_PREFIX}{i}.{field}": value
        for i, payload in enumerate(named.values())
        for field, value in payload.tensors().items()
    }
    return list(named), tensors


def unflatten_named(names: list[str], tensors: dict[str, Tensor]) -> Named:
    """Inverse of `flatten_named`."""
    fields: list[dict[str, Tensor]] = [{} for _ in names]
    for key, value in tensors.items():
        index, field = key[len(NAMED_PREFIX) :].split(".")
        fields[int(index)][field] = value
    return {name: TeacherPayload(**f) for name, f in zip(names, fields)}


def concat_named(parts: list[Named], pad) -> Named:
    """Row-wise concatenation of the shards' payloads, teacher by teacher; `pad(values)`
    right-pads a list of tensors to a common width."""
    names = list(parts[0])
    if any(list(part) != names for part in parts):
        raise ValueError("cannot concatenate batches scored by different teachers")
    out = {}
    for name in names:
        fields = parts[0][name].tensors()
        out[name] = TeacherPayload(
            **{f: torch.cat(pad([part[name].tensors()[f] for part in parts]), 0) for f in fields}
        )
    return out


def attach_outputs(batch, fields: dict[str, Tensor], store_as: str | None):
    """`batch` (a RolloutBatch) with a scorer's `fields` (named as the standard fields): in
    those fields, or under `store_as` in `named_teachers` when several teachers score."""
    if store_as is None:
        return batch.replace(**fields)
    if store_as in batch.named_teachers:
        raise ValueError(f"teacher {store_as!r} scored this batch twice")
    named = {**batch.named_teachers, store_as: TeacherPayload.from_fields(fields)}
    return batch.replace(named_teachers=named)
