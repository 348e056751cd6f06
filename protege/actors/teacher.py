"""Teacher scoring: the teacher's outputs on the responses of a batch (SPEC §2).

`teacher_outputs` is the pure part, shared with the learner's LoRA self-distillation
(the same base model with the adapter disabled); `TeacherScorer` is the worker class the
Ray actor wraps. Shapes: B batch, T response tokens, V vocab, K top-k.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import Tensor

from protege.capabilities import HIDDEN_NEEDS_PLAIN_HEAD, SELF_TEACHER_HAS_NO_SCORER
from protege.config import SELF_TEACHER
from protege.memory import peak_metrics
from protege.modeling import (
    TOKENIZER_FILES,
    load_frozen_model,
    load_tokenizer,
    resolve_path,
    response_logits,
    vocab_size,
)
from protege.privileged import scored_on_view
from protege.records import RolloutBatch, RolloutPlan
from protege.teacher_payload import attach_outputs


def teacher_outputs(
    model: torch.nn.Module,
    batch: RolloutBatch,
    plan: RolloutPlan,
    micro_batch_size: int,
    vocab: int | None = None,
) -> RolloutBatch:
    """`batch` with the teacher outputs `plan.teacher_need` asks for.

    Always `teacher_logprobs` [B,T] (log p_T(y_t) at temperature 1, 0 where masked); for
    "topk" also `teacher_topk_ids`/`teacher_topk_logprobs` [B,T,K] (K = min(topk, V), on
    log_softmax(logits / plan.temperature)) and `teacher_tail_logprobs` [B,T], the exact
    log mass outside the top-k (−inf when K = V); for "full" also `teacher_logits` [B,T,V]
    (float32, untempered); for "hidden" also `teacher_hidden` [B,T,d], the input of the
    teacher's output head in the model's dtype (protege.teacher_head decodes it into those
    logits). "none" returns `batch` unchanged. `model` is any module that
    `response_logits` accepts; the caller chooses its mode (eval, adapter disabled, ...).
    `vocab`: the ids the tokenizer can emit; wider (padded) logits are cut to them first.
    """
    need = plan.teacher_need
    if need == "none":
        return batch
    if need not in ("sampled", "topk", "full", "hidden"):
        raise ValueError(
            f"unknown teacher_need {need!r}; expected none, sampled, topk, full or hidden"
        )
    if need == "topk" and plan.topk < 1:
        raise ValueError(f"teacher_need='topk' needs plan.topk >= 1, got {plan.topk}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    parts: list[dict[str, Tensor]] = []
    step = rows_within_budget(model, batch, micro_batch_size)
    # no_grad rather than inference_mode: under ZeRO-3 the learner's self-teacher pass would
    # leave DeepSpeed's re-partitioned parameters as inference tensors.
    with torch.no_grad():
        for start in range(0, batch.size, step):
            rows = batch.select(slice(start, start + step))
            parts.append(_score_rows(model, rows, plan, vocab))
    fields = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    return attach_outputs(batch, fields, plan.store_as)


LOGITS_BUDGET = 2**26  # float32 logits per forward (256 MiB); log-softmax copies scale with it


def rows_within_budget(model: torch.nn.Module, batch: RolloutBatch, micro_batch_size: int) -> int:
    """Rows per forward: `micro_batch_size`, fewer when their [rows, T, V] float32 logits
    would pass LOGITS_BUDGET (a 49k-152k vocabulary at batch 64 is gigabytes per copy)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        return micro_batch_size
    per_row = (batch.response_ids.shape[1] + 1) * vocab
    return max(1, min(micro_batch_size, LOGITS_BUDGET // per_row))


def _score_rows(
    model: torch.nn.Module, rows: RolloutBatch, plan: RolloutPlan, vocab: int | None
) -> dict[str, Tensor]:
    if plan.teacher_need == "hidden":
        logits, hidden = _logits_and_head_input(model, rows)
    else:
        logits = response_logits(model, rows).float().cpu()  # [b,T,V]
    # Padded rows of the output embedding (Qwen2.5-7B: 152064 for 151665 token ids) are ids
    # no tokenizer emits: cut, so the distribution is over real tokens and top-k ids always
    # index the student's (at least tokenizer-wide) logits.
    logits = logits[..., :vocab]
    mask = rows.response_mask
    logp = torch.log_softmax(logits, dim=-1)
    sampled = logp.gather(-1, rows.response_ids.unsqueeze(-1)).squeeze(-1)
    out = {"teacher_logprobs": torch.where(mask, sampled, torch.zeros_like(sampled))}
    if plan.teacher_need == "topk":
        tempered = (
            logp if plan.temperature == 1.0 else torch.log_softmax(logits / plan.temperature, -1)
        )
        out.update(_topk_with_tail(tempered, plan.topk))
    elif plan.teacher_need == "full":
        out["teacher_logits"] = logits
    elif plan.teacher_need == "hidden":
        out["teacher_hidden"] = hidden.cpu().masked_fill(~mask.unsqueeze(-1), 0)
    return out


def _logits_and_head_input(model: torch.nn.Module, rows: RolloutBatch) -> tuple[Tensor, Tensor]:
    """([b,T,V] float32 logits, [b,T,d] what the output head read to make them) from one
    forward: a hook on the head catches its input (the last hidden state after the final
    norm), so no model family's layout is assumed."""
    head = model.get_output_embeddings()
    caught: list[Tensor] = []
    hook = head.register_forward_hook(lambda module, args, output: caught.append(args[0]))
    try:
        logits = response_logits(model, rows)  # [b,T,V]
    finally:
        hook.remove()
    width = rows.response_ids.shape[1]  # the head read only the positions that predict them
    hidden = caught[-1][:, -(width + 1) : -1]  # [b,T,d]
    _check_plain_head(head, hidden, logits)
    return logits.float().cpu(), hidden


def _check_plain_head(head: torch.nn.Module, hidden: Tensor, logits: Tensor) -> None:
    """The learner decodes logits as head(hidden): refuse a model whose logits are
    something more (Gemma-2's softcapping, Cohere's or Granite's logit scaling)."""
    again = head(hidden[:1]).float()
    tolerance = 1e-4 if hidden.dtype == torch.float32 else 2e-2  # 16-bit: a few ulps
    if not torch.allclose(again, logits[:1].float(), rtol=tolerance, atol=tolerance):
        raise ValueError(HIDDEN_NEEDS_PLAIN_HEAD)


def _topk_with_tail(logp: Tensor, topk: int) -> dict[str, Tensor]:
    """Top-k ids/log-probs [b,T,K] and the log-sum-exp of everything else [b,T]. The tail is
    taken from the log-probs themselves, not as log(1 − Σ top-k), which cancels badly."""
    k = min(topk, logp.shape[-1])
    values, ids = logp.topk(k, dim=-1)
    if k == logp.shape[-1]:
        tail = torch.full(logp.shape[:-1], -math.inf)
    else:
        tail = logp.scatter(-1, ids, -math.inf).logsumexp(-1)
    return {"teacher_topk_ids": ids, "teacher_topk_logprobs": values, "teacher_tail_logprobs": tail}


def emitted_ids(model: str, width: int) -> int:
    """How many ids the teacher's tokenizer emits (its logits are cut to them); the model's
    width when its directory holds no tokenizer (a bare model directory: nothing to cut by)."""
    path = Path(resolve_path(model))
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return width
    return min(len(load_tokenizer(model)), width)


class TeacherScorer:
    """A frozen teacher that scores rollout batches (wrapped as a Ray actor elsewhere)."""

    def __init__(
        self,
        model: str,
        dtype: str = "float32",
        micro_batch_size: int = 64,
        student_tokenizer: str | None = None,
    ) -> None:
        if model == SELF_TEACHER:
            raise ValueError(SELF_TEACHER_HAS_NO_SCORER)
        if micro_batch_size < 1:
            raise ValueError(f"teacher.micro_batch_size must be >= 1, got {micro_batch_size}")
        self.model = load_frozen_model(model, dtype)
        self.micro_batch_size = micro_batch_size
        self.tokens = emitted_ids(model, vocab_size(self.model))
        # a teacher that re-reads the student's text with its own tokenizer (protege.xtok)
        self.cross = cross_scorer(self.model, model, student_tokenizer, self.tokens)

    @property
    def vocab_size(self) -> int:
        """The width of the distributions it ships: its tokenizer's ids (no padding)."""
        return self.tokens

    def score(self, batch: RolloutBatch, plan: RolloutPlan) -> RolloutBatch:
        """Teacher outputs for `batch`, with the worker's seconds, scored tokens and the bytes
        of teacher outputs it ships added to `extras`."""
        started = time.perf_counter()
        if plan.cross_tokenizer != "none" and plan.teacher_need != "none":
            scored = self._cross(plan).score(batch, plan, self.micro_batch_size)
        else:
            self._check_plain(plan)
            scored = scored_on_view(
                batch,
                plan,
                lambda view: teacher_outputs(
                    self.model, view, plan, self.micro_batch_size, self.tokens
                ),
            )
        if scored is batch:  # teacher_need "none": nothing scored
            return batch
        seconds = time.perf_counter() - started
        extras = {
            "teacher/seconds": seconds,
            "teacher/tokens": batch.num_response_tokens,
            "teacher/payload_bytes": float(payload_bytes(scored)),
            **peak_metrics("teacher"),
        }
        if plan.store_as is not None:  # several teachers, scored one after the other
            extras.update(named_extras(batch.extras, extras, plan.store_as))
        return scored.replace(extras={**scored.extras, **extras})

    def _check_plain(self, plan: RolloutPlan) -> None:
        """A teacher of another tokenizer cannot score the student's ids as its own."""
        if self.cross is None or self.cross.same_vocabulary or plan.teacher_need == "none":
            return
        raise ValueError(
            "this teacher's tokenizer is not the student's: it scores only through "
            f"cross-tokenizer distillation, not teacher_need={plan.teacher_need!r} on the "
            "student's ids (trainer.eval_teacher_kl and answer-less test rows need a teacher "
            "with the student's tokenizer)"
        )

    def _cross(self, plan: RolloutPlan):
        if self.cross is None:
            raise ValueError(
                f"plan.cross_tokenizer={plan.cross_tokenizer!r} needs the student's tokenizer: "
                "construct the teacher scorer with student_tokenizer"
            )
        return self.cross


def cross_scorer(model: torch.nn.Module, name: str, student_tokenizer: str | None, vocab: int):
    """The cross-tokenizer scorer of teacher `name`, or None without a student tokenizer."""
    if student_tokenizer is None:
        return None
    from protege.xtok.scorer import CrossTokenizerScorer

    return CrossTokenizerScorer(
        model, load_tokenizer(name), load_tokenizer(student_tokenizer), vocab
    )


TEACHER_FIELDS = (
    "teacher_logprobs",
    "teacher_topk_ids",
    "teacher_topk_logprobs",
    "teacher_tail_logprobs",
    "teacher_logits",
    "teacher_hidden",
    "teacher_span_tokens",
    "teacher_span_logprobs",
    "teacher_span_exact",
)


def payload_bytes(batch: RolloutBatch) -> int:
    """Bytes of teacher outputs a batch carries (what scoring adds to the wire)."""
    tensors = (getattr(batch, name) for name in TEACHER_FIELDS)
    named = sum(payload.nbytes for payload in batch.named_teachers.values())
    return named + sum(t.numel() * t.element_size() for t in tensors if t is not None)


def named_extras(before: dict[str, float], mine: dict[str, float], name: str) -> dict[str, float]:
    """One of several teachers' extras: its seconds also as `teacher/<name>/seconds`, and the
    totals over the teachers that scored this shard before it (they run one after another)."""
    out = {"teacher/seconds": before.get("teacher/seconds", 0.0) + mine["teacher/seconds"]}
    out["teacher/tokens"] = before.get("teacher/tokens", 0.0) + mine["teacher/tokens"]
    out[f"teacher/{name}/seconds"] = mine["teacher/seconds"]
    return out
