"""The privileged teachers' prompt ids a batch carries (see protege.privileged).

Shapes: B rows, P_n the n-th teacher's prompt tokens (left-padded, like `prompt_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PREFIX = "teacher_prompt/"  # flat tensor names on the wire and in checkpoints


@dataclass(frozen=True)
class TeacherPrompts:
    """teacher name -> its prompt for every row of the batch."""

    ids: dict[str, Tensor]  # name -> [B,P_n] long, left-padded
    mask: dict[str, Tensor]  # name -> [B,P_n] bool

    def select(self, rows) -> TeacherPrompts:
        """Rows `rows` (a slice, indices or a mask: what `RolloutBatch.select` takes)."""
        return TeacherPrompts(
            {name: ids[rows] for name, ids in self.ids.items()},
            {name: mask[rows] for name, mask in self.mask.items()},
        )

    def repeat(self, n: int) -> TeacherPrompts:
        """Each row `n` times in a row (several samples per prompt)."""
        if n == 1:
            return self
        return TeacherPrompts(
            {name: ids.repeat_interleave(n, dim=0) for name, ids in self.ids.items()},
            {name: mask.repeat_interleave(n, dim=0) for name, mask in self.mask.items()},
        )

    def flat(self) -> dict[str, Tensor]:
        """Its tensors under flat names (to pack with a batch's other tensors)."""
        out = {f"{PREFIX}ids/{name}": ids for name, ids in self.ids.items()}
        out.update({f"{PREFIX}mask/{name}": mask for name, mask in self.mask.items()})
        return out


def from_flat(tensors: dict[str, Tensor]) -> TeacherPrompts | None:
    """Inverse of `TeacherPrompts.flat`, taking its names out of `tensors`; None when none."""
    names = [key for key in tensors if key.startswith(PREFIX)]
    if not names:
        return None
    ids, mask = {}, {}
    for key in names:
        kind, name = key[len(PREFIX) :].split("/", 1)
        (ids if kind == "ids" else mask)[name] = tensors.pop(key)
    return TeacherPrompts(ids, mask)


def concat_prompts(parts: list[TeacherPrompts | None]) -> TeacherPrompts | None:
    """Row-wise concatenation, each teacher's prompts left-padded to a common width."""
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise ValueError("cannot concatenate batches where only some have 'teacher_prompts'")
    ids, mask = {}, {}
    for name in parts[0].ids:
        width = max(p.ids[name].shape[1] for p in parts)
        ids[name] = torch.cat([_left_pad(p.ids[name], width) for p in parts])
        mask[name] = torch.cat([_left_pad(p.mask[name], width) for p in parts])
    return TeacherPrompts(ids, mask)


def _left_pad(values: Tensor, width: int) -> Tensor:
    missing = width - values.shape[1]
    if missing == 0:
        return values
    pad = torch.zeros((values.shape[0], missing), dtype=values.dtype)
    return torch.cat([pad, values], dim=1)
