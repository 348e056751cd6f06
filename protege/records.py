"""Typed records that cross actor boundaries.

Shapes: B batch rows, P prompt tokens, T response tokens, K teacher top-k, V vocab,
d teacher hidden size, N pre-training rows, L pre-training tokens. Every tensor is on CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal

import torch
from torch import Tensor

from protege.kv.cache import KV_PREFIX, LayerKV, concat_kv, flatten_kv, unflatten_kv
from protege.memory import PEAK_SUFFIX
from protege.teacher_payload import (
    NAMED_PREFIX,
    Named,
    concat_named,
    flatten_named,
    unflatten_named,
)
from protege.teacher_prompts import TeacherPrompts, concat_prompts, from_flat
from protege.tensor_pack import pack_tensors, tensor_buffers, tensors_from_buffers, unpack_tensors

TeacherNeed = Literal["none", "sampled", "topk", "full", "hidden", "kv"]
Source = Literal["student", "dataset", "teacher"]


class TokenSource(IntEnum):
    """Who produced a response token (stored per token in `RolloutBatch.token_source`)."""

    STUDENT = 0
    TEACHER = 1
    DATASET = 2


@dataclass(frozen=True)
class RewriteSpec:
    """Gated dual-KL teacher rewrite: a step whose KL(q||p) >= threshold is re-sampled by
    the teacher (argmax, or nucleus with `top_p`)."""

    threshold: float
    mode: Literal["argmax", "nucleus"] = "argmax"
    top_p: float = 0.9
    step_delimiter_id: int | None = None  # None: every token is a step


@dataclass(frozen=True)
class RolloutPlan:
    """What one training step needs from the samplers and the teacher; made by `plan(step)`."""

    source: Source = "student"  # who writes the responses
    teacher_need: TeacherNeed = "sampled"  # which teacher outputs the loss reads
    topk: int = 0  # K when teacher_need == "topk"
    temperature: float = 1.0  # temperature the teacher's top-k / full outputs are taken at
    samples_per_prompt: int = 1  # several samples per prompt share a group id
    mix_alpha: float = 0.0  # MiniLLM teacher-mixed sampling: p~ = a*p_T + (1-a)*q
    rewrite: RewriteSpec | None = None  # gated dual-KL teacher rewrite
    pretrain_weight: float = 0.0  # weight of the LM loss on pre-training text (0 = off)
    # teacher_need "kv": how a teacher reading other tokens (prefix, tokenizer) is aligned
    kv_time_align: Literal["resample", "segment", "char"] = "segment"
    # the teacher scoring this call reads its own prompt, batch.teacher_prompts[name] (set
    # per teacher client, never by an algorithm; protege.privileged)
    teacher_prompt: str | None = None
    # several teachers: the teacher whose scorer this plan goes to files its outputs under
    # this name (`RolloutBatch.named_teachers`) instead of the standard fields
    store_as: str | None = None
    # a teacher with another tokenizer re-reads the text and ships span-aligned outputs in the
    # student's layout (protege.xtok): GOLD's paired ids + tail, or ULD's sorted log-probs
    cross_tokenizer: Literal["none", "gold", "uld"] = "none"

    @property
    def needs_teacher_in_decoding(self) -> bool:
        return self.mix_alpha > 0 or self.rewrite is not None


@dataclass(frozen=True)
class PromptBatch:
    """Prompts for one step, with what the data source knows about them."""

    prompt_ids: Tensor  # [B,P] long, left-padded
    prompt_mask: Tensor  # [B,P] bool
    answers: tuple[str | None, ...] = ()  # [B] reference answers (rule rewards, evaluation)
    completion_ids: Tensor | None = (
        None  # [B,C] long, dataset responses ending in EOS, right-padded
    )
    completion_mask: Tensor | None = None  # [B,C] bool
    pretrain_ids: Tensor | None = None  # [N,L] long, pre-training text for MiniLLM's LM loss
    pretrain_mask: Tensor | None = None  # [N,L] bool
    step: int = 0
    teacher_prompts: TeacherPrompts | None = None  # privileged teachers' prompts, per row
    teacher_route: Tensor | None = None  # [B] long, index of the teacher each row names

    @property
    def size(self) -> int:
        return int(self.prompt_ids.shape[0])


@dataclass(frozen=True)
class WeightUpdate:
    """Learner weights for the samplers: the full state dict, or only the LoRA adapter."""

    version: int  # learner updates applied so far
    tensors: dict[str, Tensor]  # name -> CPU tensor (peft adapter names when lora_only)
    lora_only: bool = False

    def __reduce__(self):  # each tensor's bytes as they are: tensor_pack.tensor_buffers
        return _unpack_weights, (self.version, tensor_buffers(self.tensors), self.lora_only)


@dataclass(frozen=True)
class RolloutBatch:
    """One batch of prompts, responses and everything later stages attach to them."""

    prompt_ids: Tensor  # [B,P] long, left-padded
    prompt_mask: Tensor  # [B,P] bool
    response_ids: Tensor  # [B,T] long, right-padded
    response_mask: Tensor  # [B,T] bool, True on real response tokens (EOS included)
    token_source: Tensor | None = None  # [B,T] int8 TokenSource
    behaviour_logprobs: Tensor | None = None  # [B,T] log-prob under the distribution that sampled
    student_logprobs: Tensor | None = None  # [B,T] log q_old(y_t), the sampling-time student
    teacher_logprobs: Tensor | None = None  # [B,T] log p_T(y_t) of the response tokens
    teacher_topk_ids: Tensor | None = None  # [B,T,K] long, teacher's top-k token ids
    teacher_topk_logprobs: Tensor | None = None  # [B,T,K] their log-probs
    teacher_tail_logprobs: Tensor | None = None  # [B,T] log of the teacher mass outside top-k
    teacher_logits: Tensor | None = None  # [B,T,V] full teacher logits
    # [B,T,d] the input of the teacher's output head (its last hidden state, after the final
    # norm), in the teacher's dtype, 0 where masked; the learner decodes it into
    # teacher_logits with its frozen copy of the head (protege.teacher_head)
    teacher_hidden: Tensor | None = None
    # one LayerKV per KV teacher, in config order: L_t × [B,H_t,P+T,D_t] on the student's
    # sequence layout, keys with the teacher's RoPE undone, 0 where the student pads
    teacher_kv: tuple[LayerKV, ...] | None = None
    rewards: Tensor | None = None  # [B] float, sequence rewards
    advantages: Tensor | None = None  # [B,T] float, per-token advantages
    importance_weights: Tensor | None = None  # [B,T] float, detached correction weights
    group_ids: Tensor | None = None  # [B] long, rows sampled from the same prompt share an id
    answers: tuple[str | None, ...] = ()  # [B] reference answers for rule rewards
    pretrain_ids: Tensor | None = None  # [N,L] long, pre-training text (MiniLLM LM loss)
    pretrain_mask: Tensor | None = None  # [N,L] bool
    token_count: float | None = None  # response tokens in the global batch (loss normaliser)
    pretrain_token_count: float | None = None  # LM targets in the global pre-training text
    step: int = 0  # training step this batch belongs to (schedules read it)
    weights_version: int = 0  # learner version whose weights sampled this batch
    extras: dict[str, float] = field(default_factory=dict)  # scalar rollout metrics
    # privileged teachers' own prompts, name -> [B,P_n] (protege.privileged)
    teacher_prompts: TeacherPrompts | None = None
    # several teachers: each one's outputs under its name, in config order; the learner
    # fuses them into the standard teacher_* fields before the loss (protege.fusion)
    named_teachers: Named = field(default_factory=dict)
    teacher_route: Tensor | None = None  # [B] long, index of the teacher each row names
    # A teacher with another tokenizer (plan.cross_tokenizer, protege.xtok): at the first
    # student token of each aligned span, the student tokens the span holds (0 elsewhere),
    # log p_T of the span's text, and whether it is one same-string token on both sides
    teacher_span_tokens: Tensor | None = None  # [B,T] long
    teacher_span_logprobs: Tensor | None = None  # [B,T] float
    teacher_span_exact: Tensor | None = None  # [B,T] bool

    def __reduce__(self):
        """Pickled (Ray, checkpoints) with all tensors in one byte buffer: see `pack_tensors`."""
        tensors, rest = {}, {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            (tensors if isinstance(value, Tensor) else rest)[f.name] = value
        if rest.pop("teacher_kv") is not None:
            tensors.update(flatten_kv(self.teacher_kv))
        if rest.pop("teacher_prompts") is not None:
            tensors.update(self.teacher_prompts.flat())
        rest["named_teachers"], named = flatten_named(rest.pop("named_teachers"))
        tensors.update(named)
        return _unpack_batch, (pack_tensors(tensors), rest)

    def replace(self, **changes) -> RolloutBatch:
        return dataclasses.replace(self, **changes)

    @property
    def size(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def num_response_tokens(self) -> float:
        return float(self.response_mask.sum())

    def normaliser(self) -> float:
        """Tokens to divide summed losses by: the global count when set (micro-batches and
        data-parallel ranks then give the gradient of the whole batch), else this batch's."""
        return self.token_count if self.token_count is not None else self.num_response_tokens

    def pretrain_normaliser(self) -> float:
        """LM targets to divide summed pre-training NLL by (global when set, like `normaliser`)."""
        if self.pretrain_token_count is not None:
            return self.pretrain_token_count
        return (
            float(lm_targets(self.pretrain_mask).sum()) if self.pretrain_mask is not None else 0.0
        )

    def select(self, rows: Tensor | slice | list[int]) -> RolloutBatch:
        """Rows `rows` of every per-row field; scalars and pre-training text are kept. A slice
        gives views (shards and micro-batches copy no tensor); indices and masks gather."""
        index = _as_index(rows, self.size)
        take = rows if isinstance(rows, slice) else index
        changes = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _PER_ROW_TENSORS and value is not None:
                changes[f.name] = value[take]
        if self.answers:
            changes["answers"] = tuple(self.answers[i] for i in index.tolist())
        if self.teacher_kv is not None:
            changes["teacher_kv"] = tuple(kv.select(take) for kv in self.teacher_kv)
        if self.teacher_prompts is not None:
            changes["teacher_prompts"] = self.teacher_prompts.select(take)
        if self.named_teachers:
            changes["named_teachers"] = {
                name: payload.map(lambda t: t[take])
                for name, payload in self.named_teachers.items()
            }
        return dataclasses.replace(self, **changes)

    def shards(self, parts: int, keep_empty: bool = False) -> list[RolloutBatch]:
        """`parts` contiguous row shards that keep the global normalisers; the pre-training
        rows are dealt out the same way, so over the shards every row and LM target counts
        once (data-parallel ranks)."""
        return self._shards(row_chunks(self.size, parts, keep_empty=True), keep_empty)

    def split(self, micro_batch_size: int) -> list[RolloutBatch]:
        """Micro-batches of `micro_batch_size` rows (the last may be smaller) that keep the
        global normalisers, the pre-training rows dealt out among them."""
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        starts = range(0, max(self.size, 1), micro_batch_size)
        return self._shards([slice(s, min(s + micro_batch_size, self.size)) for s in starts], True)

    def _shards(self, rows: list[slice], keep_empty: bool) -> list[RolloutBatch]:
        whole = self.replace(
            token_count=self.normaliser(), pretrain_token_count=self.pretrain_normaliser()
        )
        text_rows = row_chunks(self._pretrain_rows(), len(rows), keep_empty=True)
        out = []
        for part, text in zip(rows, text_rows):
            if not keep_empty and part.stop == part.start:
                continue
            shard = whole.select(part)
            if self.pretrain_ids is not None:
                shard = shard.replace(
                    pretrain_ids=self.pretrain_ids[text], pretrain_mask=self.pretrain_mask[text]
                )
            out.append(shard)
        return out

    def _pretrain_rows(self) -> int:
        return 0 if self.pretrain_ids is None else int(self.pretrain_ids.shape[0])


def row_chunks(size: int, parts: int, keep_empty: bool = False) -> list[slice]:
    """`parts` contiguous slices covering range(size), as even as possible."""
    bounds = [round(i * size / parts) for i in range(parts + 1)]
    return [
        slice(bounds[i], bounds[i + 1])
        for i in range(parts)
        if keep_empty or bounds[i + 1] > bounds[i]
    ]


def lm_targets(mask: Tensor) -> Tensor:
    """[N,L] text mask -> [N,L-1]: positions whose next token is text and follows text."""
    return mask[:, 1:].bool() & mask[:, :-1].bool()


_PER_ROW_TENSORS = frozenset(
    {
        "prompt_ids",
        "prompt_mask",
        "response_ids",
        "response_mask",
        "token_source",
        "behaviour_logprobs",
        "student_logprobs",
        "teacher_logprobs",
        "teacher_topk_ids",
        "teacher_topk_logprobs",
        "teacher_tail_logprobs",
        "teacher_logits",
        "teacher_hidden",
        "rewards",
        "advantages",
        "importance_weights",
        "group_ids",
        "teacher_route",
        "teacher_span_tokens",
        "teacher_span_logprobs",
        "teacher_span_exact",
    }
)


def _as_index(rows: Tensor | slice | list[int], size: int) -> Tensor:
    if isinstance(rows, slice):
        return torch.arange(size)[rows]
    index = torch.as_tensor(rows)
    if index.dtype == torch.bool:  # a row mask, not the indices 0 and 1
        return index.nonzero().squeeze(-1)
    return index.long()


def concat(batches: list[RolloutBatch]) -> RolloutBatch:
    """Stack batches row-wise (right-padding responses, left-padding prompts)."""
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    changes: dict[str, object] = {}
    for name in _PER_ROW_TENSORS:
        values = [getattr(b, name) for b in batches]
        if all(v is None for v in values):
            continue
        if any(v is None for v in values):
            raise ValueError(f"cannot concatenate batches where only some have {name!r}")
        left = name.startswith("prompt")
        changes[name] = torch.cat(_pad_to_common(values, left=left), dim=0)
    if any(b.teacher_kv is not None for b in batches):
        if any(b.teacher_kv is None for b in batches):
            raise ValueError("cannot concatenate batches where only some have 'teacher_kv'")
        prompts = [int(b.prompt_ids.shape[1]) for b in batches]
        changes["teacher_kv"] = concat_kv([b.teacher_kv for b in batches], prompts)
    if any(b.named_teachers for b in batches):
        pad = lambda values: _pad_to_common(values, left=False)
        changes["named_teachers"] = concat_named([b.named_teachers for b in batches], pad)
    changes["answers"] = tuple(a for b in batches for a in b.answers)
    changes["teacher_prompts"] = concat_prompts([b.teacher_prompts for b in batches])
    changes["token_count"] = None
    changes["pretrain_token_count"] = None
    return dataclasses.replace(first, extras=combine_extras(batches), **changes)


# `extras` keys that are totals over a shard's rows (counts, tokens, worker seconds): shards
# add up. Every other extra is a per-row mean: shards combine by their row counts.
SUMMED_EXTRA_SUFFIXES = ("seconds", "_count", "_bytes", "/tokens", "rewritten_steps")


def combine_extras(batches: list[RolloutBatch]) -> dict[str, float]:
    """One `extras` for shards of a batch: totals summed, means weighted by each shard's rows
    (a key a shard lacks is averaged over the shards that have it)."""
    sums: dict[str, float] = {}
    rows: dict[str, float] = {}
    peaks: dict[str, float] = {}  # per-process peaks (protege.memory): the largest
    for batch in batches:
        for key, value in batch.extras.items():
            if key.endswith(PEAK_SUFFIX):
                peaks[key] = max(peaks.get(key, value), value)
                continue
            summed = key.endswith(SUMMED_EXTRA_SUFFIXES)
            weight = 1.0 if summed else float(batch.size)
            sums[key] = sums.get(key, 0.0) + weight * value
            rows[key] = rows.get(key, 0.0) + (0.0 if summed else weight)
    means = {key: total / rows[key] if rows[key] else total for key, total in sums.items()}
    return {**means, **peaks}


def _pad_to_common(values: list[Tensor], left: bool) -> list[Tensor]:
    if values[0].dim() < 2:
        return values
    width = max(v.shape[1] for v in values)
    padded = []
    for v in values:
        missing = width - v.shape[1]
        if missing == 0:
            padded.append(v)
            continue
        pad_shape = (v.shape[0], missing, *v.shape[2:])
        pad = torch.zeros(pad_shape, dtype=v.dtype)
        padded.append(torch.cat([pad, v] if left else [v, pad], dim=1))
    return padded


# -- wire format -------------------------------------------------------------------------
def _unpack_weights(version: int, buffers: list, lora_only: bool) -> WeightUpdate:
    tensors = tensors_from_buffers(buffers)
    return WeightUpdate(version=version, tensors=tensors, lora_only=lora_only)


def _unpack_batch(packed: tuple, rest: dict) -> RolloutBatch:
    tensors = unpack_tensors(*packed)
    prompts = from_flat(tensors)
    kv = {name: tensors.pop(name) for name in list(tensors) if name.startswith(KV_PREFIX)}
    named = {name: tensors.pop(name) for name in list(tensors) if name.startswith(NAMED_PREFIX)}
    rest["named_teachers"] = unflatten_named(rest["named_teachers"], named)
    return RolloutBatch(**tensors, **rest, teacher_kv=unflatten_kv(kv), teacher_prompts=prompts)
