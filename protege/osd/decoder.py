"""Speculative decoding of one request: the draft proposes, the target verifies in one forward.

Models are anything called like an HF causal LM (`model(input_ids=..., use_cache=False)
.logits`); each forward re-reads the whole sequence (no KV cache: the tiny task's
sequences are ~10 tokens, and without a cache a draft-weight reload needs no cache reset).
`k = 0` is plain target decoding through the same code, the "no speculation" baseline.
Shapes: P prompt tokens, T response tokens, K proposals, V vocab.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from protege.osd.speculative import Verdict, probabilities, sample, verify_greedy, verify_sampled


@dataclass(frozen=True)
class Decoded:
    """One request's response and what the draft and the target said at each position."""

    response_ids: Tensor  # [T] long, EOS included when reached
    draft_logprobs: Tensor  # [T,V] float32 log q at temperature 1; 0 where nothing was verified
    target_logprobs: Tensor  # [T,V] float32 log p at temperature 1
    # [T] bool: the target judged a draft proposal at this position (proposals after a
    # rejection are discarded unjudged: they count in `draft_forwards` only)
    verified: Tensor
    rejected: Tensor  # [T] bool: ... and turned it down
    rounds: int  # target forwards (verification rounds)
    draft_forwards: int
    draft_seconds: float
    target_seconds: float

    @property
    def num_verified(self) -> int:
        return int(self.verified.sum())

    @property
    def num_accepted(self) -> int:
        return int((self.verified & ~self.rejected).sum())


@dataclass
class _Trace:
    """Per-position columns collected while decoding."""

    tokens: list[int] = field(default_factory=list)
    draft: list[Tensor | None] = field(default_factory=list)
    target: list[Tensor] = field(default_factory=list)
    rejected: list[bool] = field(default_factory=list)
    draft_forwards: int = 0
    draft_seconds: float = 0.0
    target_seconds: float = 0.0


class SpeculativeDecoder:
    """Draft-propose / target-verify decoding with the exact acceptance rule.

    temperature 0 is greedy (the output is the target's greedy output); temperature > 0
    samples, and the output is distributed exactly as the target's samples at that
    temperature (`protege.osd.speculative`).
    """

    def __init__(
        self,
        draft: torch.nn.Module,
        target: torch.nn.Module,
        eos_ids: list[int],
        temperature: float = 0.0,
    ):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        self.draft, self.target = draft, target
        self.eos_ids = frozenset(eos_ids)
        self.temperature = temperature

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        k: int,
        generator: torch.Generator | None = None,
    ) -> Decoded:
        """The response to `prompt_ids` [P], up to EOS or `max_new_tokens` tokens, `k`
        proposals per round (fewer when the budget or a proposed EOS ends the round)."""
        trace = _Trace()
        sequence = prompt_ids.tolist()
        rounds = 0
        while len(trace.tokens) < max_new_tokens:
            budget = min(k, max_new_tokens - len(trace.tokens))
            proposals, draft_logits = self._propose(sequence, budget, trace, generator)
            target_logits = self._verify_forward(sequence + proposals, len(proposals), trace)
            verdict = self._verdict(proposals, draft_logits, target_logits, generator)
            rounds += 1
            emitted = self._record(trace, proposals, draft_logits, target_logits, verdict)
            sequence += emitted
            if self.eos_ids & set(emitted):
                break
        return _finish(trace, max_new_tokens, rounds)

    def _propose(
        self, sequence: list[int], budget: int, trace: _Trace, generator
    ) -> tuple[list[int], list[Tensor]]:
        proposals: list[int] = []
        logits: list[Tensor] = []
        for _ in range(budget):
            started = time.perf_counter()
            last = _next_logits(self.draft, sequence + proposals)
            trace.draft_seconds += time.perf_counter() - started
            trace.draft_forwards += 1
            token = self._choose(last, generator)
            proposals.append(token)
            logits.append(last)
            if token in self.eos_ids:  # nothing follows an EOS: no point proposing past it
                break
        return proposals, logits

    def _verify_forward(self, sequence: list[int], proposed: int, trace: _Trace) -> Tensor:
        """The target's logits [K+1,V] at the proposals' positions and the one after."""
        started = time.perf_counter()
        logits = _logits(self.target, sequence)[-(proposed + 1) :]
        trace.target_seconds += time.perf_counter() - started
        return logits

    def _verdict(
        self, proposals: list[int], draft_logits: list[Tensor], target_logits: Tensor, generator
    ) -> Verdict:
        ids = torch.tensor([proposals], dtype=torch.long)  # one row: [1,K]
        if self.temperature == 0:
            return verify_greedy(ids, target_logits[None])
        draft = probabilities(_stack(draft_logits, target_logits), self.temperature)[None]
        target = probabilities(target_logits, self.temperature)[None]
        return verify_sampled(ids, draft, target, generator)

    def _choose(self, logits: Tensor, generator) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        return sample(probabilities(logits, self.temperature), generator)

    def _record(
        self,
        trace: _Trace,
        proposals: list[int],
        draft_logits: list[Tensor],
        target_logits: Tensor,
        verdict: Verdict,
    ) -> list[int]:
        """Append this round's positions to the trace; returns the tokens it emitted."""
        accepted = int(verdict.accepted[0])
        emitted = proposals[:accepted]
        ends_on_eos = accepted == len(proposals) and bool(self.eos_ids & set(emitted))
        if not ends_on_eos:
            emitted = emitted + [int(verdict.next_token[0])]
        for index, token in enumerate(emitted):
            proposed = index < len(proposals)
            trace.tokens.append(token)
            trace.draft.append(draft_logits[index] if proposed else None)
            trace.target.append(target_logits[index])
            trace.rejected.append(proposed and index == accepted)
        return emitted


def _finish(trace: _Trace, max_new_tokens: int, rounds: int) -> Decoded:
    """The trace as tensors, cut to `max_new_tokens` (a bonus token can overshoot by one)."""
    n = min(len(trace.tokens), max_new_tokens)
    target = torch.log_softmax(torch.stack(trace.target[:n]).float(), dim=-1)
    vocab = target.shape[-1]
    draft = torch.stack(
        [
            torch.zeros(vocab) if d is None else torch.log_softmax(d.float(), dim=-1)
            for d in trace.draft[:n]
        ]
    )
    return Decoded(
        response_ids=torch.tensor(trace.tokens[:n], dtype=torch.long),
        draft_logprobs=draft,
        target_logprobs=target,
        verified=torch.tensor([d is not None for d in trace.draft[:n]], dtype=torch.bool),
        rejected=torch.tensor(trace.rejected[:n], dtype=torch.bool),
        rounds=rounds,
        draft_forwards=trace.draft_forwards,
        draft_seconds=trace.draft_seconds,
        target_seconds=trace.target_seconds,
    )


def _stack(draft_logits: list[Tensor], target_logits: Tensor) -> Tensor:
    if draft_logits:
        return torch.stack(draft_logits)
    return target_logits[:0]


def _logits(model: torch.nn.Module, sequence: list[int]) -> Tensor:
    ids = torch.tensor([sequence], dtype=torch.long, device=_device(model))
    return model(input_ids=ids, use_cache=False).logits[0].cpu()


def _next_logits(model: torch.nn.Module, sequence: list[int]) -> Tensor:
    return _logits(model, sequence)[-1]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
