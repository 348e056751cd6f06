"""Teacher scoring across tokenizers: the teacher re-reads the student's text.

Per row, the student's prompt and response ids are decoded (the response token by token,
which gives each token's characters), the teacher tokenises the prompt text and the
response text apart (no merge crosses the boundary; the student's EOS becomes the
teacher's), runs one forward and ships, at the first student token of every aligned span
(`protege.xtok.align`), its distribution at the span's first teacher token:

* gold — over the paired ids (`protege.xtok.vocab`), in the student's ids: the K most
  likely pairs as `teacher_topk_ids`/`teacher_topk_logprobs` and everything else (unpaired
  teacher tokens, pairs past K) as `teacher_tail_logprobs`;
* uld — its K largest log-probs (`teacher_topk_logprobs`, ids of another vocabulary are
  not shipped) and the tail;

both on log_softmax(logits / plan.temperature), plus `teacher_span_tokens` (student tokens
in the span), `teacher_span_logprobs` (log p_T of the span's text: the sum over its teacher
tokens, same temperature) and `teacher_span_exact` (one token on each side).
`teacher_logprobs` holds log p_T(y_t) at temperature 1 at exact spans, 0 elsewhere.

Shapes: B rows, T student response tokens, T_t teacher response tokens, V_t teacher vocab,
K shipped log-probs, M paired ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from protege.modeling import response_logits
from protege.records import RolloutBatch, RolloutPlan
from protege.xtok.align import Span, aligned_characters, aligned_spans, piece_offsets
from protege.xtok.vocab import VocabularyMap, vocabulary_map


@dataclass(frozen=True)
class TeacherView:
    """One student row as the teacher reads it."""

    prompt_ids: list[int]
    response_ids: list[int]  # the teacher's tokens of the response text (+ its EOS)
    spans: list[Span]
    characters: int  # response characters (EOS counts as one)


def decoded_pieces(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([token]) for token in ids]


def teacher_view(
    student_tok, teacher_tok, prompt_ids: list[int], response_ids: list[int]
) -> TeacherView:
    """Re-tokenise one row for the teacher and align its response to the student's. The
    EOS tokens are given one virtual character at the end, so they pair as a span."""
    ends = bool(response_ids) and response_ids[-1] == student_tok.eos_token_id
    body = response_ids[:-1] if ends else response_ids
    pieces = decoded_pieces(student_tok, body)
    text = "".join(pieces)
    prompt_text = student_tok.decode(prompt_ids)
    prompt = teacher_tok(prompt_text, add_special_tokens=False)["input_ids"]
    encoded = teacher_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    theirs, their_offsets = (
        list(encoded["input_ids"]),
        [tuple(o) for o in encoded["offset_mapping"]],
    )
    our_offsets = piece_offsets(pieces)
    if ends:
        eos_span = (len(text), len(text) + 1)
        theirs.append(int(teacher_tok.eos_token_id))
        their_offsets.append(eos_span)
        our_offsets.append(eos_span)
    if not prompt and teacher_tok.bos_token_id is not None:  # something must predict token 0
        prompt = [int(teacher_tok.bos_token_id)]
    spans = aligned_spans(our_offsets, their_offsets)
    return TeacherView(prompt, theirs, spans, len(text) + int(ends))


def teacher_batch(views: list[TeacherView], pad_id: int) -> RolloutBatch:
    """The teacher's rows: prompts left-padded, responses right-padded."""
    size = len(views)
    width_p = max(1, max(len(v.prompt_ids) for v in views))
    width_r = max(1, max(len(v.response_ids) for v in views))
    prompt = torch.full((size, width_p), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(size, width_p, dtype=torch.bool)
    response = torch.full((size, width_r), pad_id, dtype=torch.long)
    response_mask = torch.zeros(size, width_r, dtype=torch.bool)
    for b, view in enumerate(views):
        p, r = len(view.prompt_ids), len(view.response_ids)
        if p:
            prompt[b, width_p - p :], prompt_mask[b, width_p - p :] = (
                torch.tensor(view.prompt_ids),
                True,
            )
        if r:
            response[b, :r], response_mask[b, :r] = torch.tensor(view.response_ids), True
    return RolloutBatch(prompt, prompt_mask, response, response_mask)


class CrossTokenizerScorer:
    """Scores student batches with a teacher of another tokenizer (see the module doc)."""

    def __init__(self, model: torch.nn.Module, teacher_tok, student_tok, vocab: int) -> None:
        self.model, self.teacher_tok, self.student_tok = model, teacher_tok, student_tok
        self.vocab = vocab  # ids the teacher's tokenizer emits (its logits are cut to them)
        self.pairs: VocabularyMap = vocabulary_map(student_tok, teacher_tok)
        self.same_vocabulary = student_tok.get_vocab() == teacher_tok.get_vocab()

    @torch.no_grad()
    def score(self, batch: RolloutBatch, plan: RolloutPlan, micro_batch_size: int) -> RolloutBatch:
        parts = [
            self._score_rows(batch.select(slice(start, start + micro_batch_size)), plan)
            for start in range(0, batch.size, micro_batch_size)
        ]
        fields = {name: torch.cat([p[0][name] for p in parts]) for name in parts[0][0]}
        chars = [sum(p[1][i] for p in parts) for i in range(3)]
        extras = {
            "xtok/aligned_char_share": chars[1] / max(chars[0], 1),
            "xtok/exact_char_share": chars[2] / max(chars[0], 1),
        }
        return batch.replace(**fields, extras={**batch.extras, **extras})

    def _score_rows(
        self, rows: RolloutBatch, plan: RolloutPlan
    ) -> tuple[dict[str, Tensor], tuple[int, int, int]]:
        views = [
            teacher_view(
                self.student_tok,
                self.teacher_tok,
                rows.prompt_ids[b][rows.prompt_mask[b]].tolist(),
                rows.response_ids[b][rows.response_mask[b]].tolist(),
            )
            for b in range(rows.size)
        ]
        tbatch = teacher_batch(views, int(self.teacher_tok.pad_token_id))
        logits = response_logits(self.model, tbatch).float().cpu()[..., : self.vocab]
        fields = self._fields(rows, views, tbatch, logits, plan)
        chars = (
            sum(v.characters for v in views),
            sum(aligned_characters(v.spans) for v in views),
            sum(aligned_characters(v.spans, exact_only=True) for v in views),
        )
        return fields, chars

    def _fields(self, rows, views, tbatch, logits, plan) -> dict[str, Tensor]:
        size, width = rows.response_ids.shape
        logp = torch.log_softmax(logits / plan.temperature, -1)  # [b,T_t,V_t]
        sampled = logp.gather(-1, tbatch.response_ids.unsqueeze(-1)).squeeze(-1)
        plain = torch.log_softmax(logits, -1).gather(-1, tbatch.response_ids.unsqueeze(-1))
        rows_at, ours, theirs, counts, lengths, exact = [], [], [], [], [], []
        for b, view in enumerate(views):
            for span in view.spans:
                rows_at.append(b)
                ours.append(span.student)
                theirs.append(span.teacher)
                counts.append(span.student_len)
                lengths.append(span.teacher_len)
                exact.append(span.exact)
        at = (torch.tensor(rows_at, dtype=torch.long), torch.tensor(ours, dtype=torch.long))
        first = logp[at[0], torch.tensor(theirs, dtype=torch.long)]  # [N,V_t]
        shipped = self._distribution(first, plan)
        out = {
            k: torch.zeros((size, width, *v.shape[1:]), dtype=v.dtype) for k, v in shipped.items()
        }
        _fill_idle(out, self.pairs)
        for name, value in shipped.items():
            out[name][at] = value
        span_logp = _span_sums(
            sampled, torch.tensor(rows_at), torch.tensor(theirs), torch.tensor(lengths)
        )
        out["teacher_span_tokens"] = torch.zeros(size, width, dtype=torch.long)
        out["teacher_span_tokens"][at] = torch.tensor(counts, dtype=torch.long)
        out["teacher_span_logprobs"] = torch.zeros(size, width)
        out["teacher_span_logprobs"][at] = span_logp
        out["teacher_span_exact"] = torch.zeros(size, width, dtype=torch.bool)
        out["teacher_span_exact"][at] = torch.tensor(exact, dtype=torch.bool)
        one = plain.squeeze(-1)[at[0], torch.tensor(theirs, dtype=torch.long)]
        out["teacher_logprobs"] = torch.zeros(size, width)
        out["teacher_logprobs"][at] = torch.where(torch.tensor(exact, dtype=torch.bool), one, 0.0)
        return out

    def _distribution(self, first: Tensor, plan: RolloutPlan) -> dict[str, Tensor]:
        """What ships per span start: [N,K] (ids,) log-probs and the [N] tail."""
        if plan.cross_tokenizer == "gold":
            paired = first[:, self.pairs.teacher_ids]  # [N,M]
            k = min(plan.topk, self.pairs.pairs)
            values, index = paired.topk(k, dim=-1)
            rest = first.clone()
            rest[torch.arange(len(first))[:, None], self.pairs.teacher_ids[index]] = -math.inf
            return {
                "teacher_topk_ids": self.pairs.student_ids[index],
                "teacher_topk_logprobs": values,
                "teacher_tail_logprobs": rest.logsumexp(-1),
            }
        k = min(plan.topk, first.shape[-1])
        values, index = first.topk(k, dim=-1)
        tail = first.scatter(-1, index, -math.inf).logsumexp(-1)
        return {"teacher_topk_logprobs": values, "teacher_tail_logprobs": tail}


def _fill_idle(out: dict[str, Tensor], pairs: VocabularyMap) -> None:
    """Positions that start no span get a harmless uniform distribution and an empty tail,
    so masked-out loss terms stay finite (a NaN there would leak through the gradient)."""
    k = out["teacher_topk_logprobs"].shape[-1]
    out["teacher_topk_logprobs"].fill_(-math.log(k))
    out["teacher_tail_logprobs"].fill_(-math.inf)
    if "teacher_topk_ids" in out:
        out["teacher_topk_ids"][:] = pairs.student_ids[torch.arange(k) % pairs.pairs]


def _span_sums(token_logp: Tensor, rows: Tensor, starts: Tensor, lengths: Tensor) -> Tensor:
    """Σ token_logp[row, start : start + length] per span. [b,T_t], [N] x3 -> [N]."""
    padded = torch.cat([torch.zeros(token_logp.shape[0], 1), token_logp.cumsum(-1)], -1)
    return padded[rows, starts + lengths] - padded[rows, starts]
