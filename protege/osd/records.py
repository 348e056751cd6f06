"""Typed records of the serving loop: requests, served responses, distillation records.

Shapes: N records, L prefix tokens (left-padded), S support of the stored distributions
(V the vocabulary with the full payload, K+1 = the target's top-k plus a tail bucket with
top-k), V vocab. Every tensor is on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from protege.records import RolloutBatch, WeightUpdate


@dataclass(frozen=True)
class Request:
    index: int  # position in the replayed traffic
    prompt: str
    arrival: float = 0.0  # seconds after the replay started at which it arrives


@dataclass(frozen=True)
class DistillRecords:
    """(prefix, draft distribution, target distribution) at verified draft proposals."""

    prefix_ids: Tensor  # [N,L] long, prompt ⧺ response before the position, left-padded
    prefix_mask: Tensor  # [N,L] bool
    token_ids: Tensor  # [N] long, the token emitted at the position
    draft_logprobs: Tensor  # [N,S] float32, the draft that proposed (at distill temperature)
    target_logprobs: Tensor  # [N,S] float32, the target (at distill temperature)
    rejected: Tensor  # [N] bool, the target turned the proposal down
    support_ids: Tensor | None = None  # [N,K] long, the target's top-k ids (None: full vocab)
    weights_version: int = 0  # draft version that proposed

    @property
    def size(self) -> int:
        return int(self.token_ids.shape[0])

    def last(self, n: int) -> DistillRecords:
        """The newest `n` records (the buffer drops the oldest ones past its capacity)."""
        keep = slice(self.size - n, self.size)
        return replace(
            self,
            prefix_ids=self.prefix_ids[keep],
            prefix_mask=self.prefix_mask[keep],
            token_ids=self.token_ids[keep],
            draft_logprobs=self.draft_logprobs[keep],
            target_logprobs=self.target_logprobs[keep],
            rejected=self.rejected[keep],
            support_ids=None if self.support_ids is None else self.support_ids[keep],
        )

    def forward_kl(self) -> Tensor:
        """KL(p‖q) per record on the stored support, as served. [N]."""
        from protege.algorithms.divergences import kl_from_logprobs

        return kl_from_logprobs(self.target_logprobs, self.draft_logprobs)

    def to_batch(self) -> RolloutBatch:
        """One row per record: prompt = the prefix, response = the one emitted token, with
        the target's distribution as teacher output, ready for the learner's `gkd` loss."""
        one = torch.ones(self.size, 1, dtype=torch.bool)
        rows = {
            "prompt_ids": self.prefix_ids,
            "prompt_mask": self.prefix_mask,
            "response_ids": self.token_ids[:, None],
            "response_mask": one,
        }
        if self.support_ids is None:
            return RolloutBatch(**rows, teacher_logits=self.target_logprobs[:, None])
        return RolloutBatch(
            **rows,
            teacher_topk_ids=self.support_ids[:, None],
            teacher_topk_logprobs=self.target_logprobs[:, None, :-1],
            teacher_tail_logprobs=self.target_logprobs[:, None, -1],
        )


def concat_records(parts: list[DistillRecords]) -> DistillRecords:
    """Records of several requests as one (prefixes left-padded to the longest)."""
    width = max(int(p.prefix_ids.shape[1]) for p in parts)

    def left_pad(t: Tensor) -> Tensor:
        return torch.nn.functional.pad(t, (width - t.shape[1], 0))

    supports = [p.support_ids for p in parts]
    return DistillRecords(
        prefix_ids=torch.cat([left_pad(p.prefix_ids) for p in parts]),
        prefix_mask=torch.cat([left_pad(p.prefix_mask) for p in parts]),
        token_ids=torch.cat([p.token_ids for p in parts]),
        draft_logprobs=torch.cat([p.draft_logprobs for p in parts]),
        target_logprobs=torch.cat([p.target_logprobs for p in parts]),
        rejected=torch.cat([p.rejected for p in parts]),
        support_ids=None if supports[0] is None else torch.cat(supports),
        weights_version=min(p.weights_version for p in parts),
    )


@dataclass(frozen=True)
class Served:
    """The server's answer to one request."""

    index: int
    text: str  # the response, special tokens dropped
    tokens: int  # response tokens
    verified: int  # draft proposals the target judged
    accepted: int  # ... of which it kept
    drafted: int  # draft proposals made (also those discarded after a rejection)
    rounds: int  # target forwards
    seconds: float  # service time inside the server
    weights_version: int  # draft version that served it
    records: DistillRecords | None = None  # what goes to the buffer (None: nothing kept)


@dataclass(frozen=True)
class DistillResult:
    """One draft update: the new weights for the server and the learner's metrics."""

    update: WeightUpdate
    records: int  # buffer records it trained on
    metrics: dict[str, float] = field(default_factory=dict)
