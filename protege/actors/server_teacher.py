"""Teacher scoring by an OpenAI-compatible server (`teacher.backend: server`).

The same interface and numbers as `VLLMTeacherScorer`, with the model on the server's own
GPUs: each micro-batch of rows is one `/v1/completions` request whose prompts are the
rows' token ids (prompt + response, nothing re-tokenised), with `prompt_logprobs` at
temperature 1; up to `concurrency` requests are in flight. The log-prob of each response
token is `sampled`; for `topk` the server's top-k per position, in rank order, and the
tail log(1 − Σ top-k) computed in float64 (`tail_logprob`). Shapes: B rows, T response
tokens, K top-k.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from protege.actors.teacher import named_extras, payload_bytes
from protege.actors.vllm_engine import outputs_from_scores, real_tokens, tail_logprob
from protege.capabilities import SERVER_TEACHER_NEEDS_URL, cannot_run, teacher_problem
from protege.config import SELF_TEACHER
from protege.memory import peak_metrics
from protege.records import RolloutBatch, RolloutPlan
from protege.teacher_payload import attach_outputs
from protege.teacher_server import (
    SERVER_NEG_INF,
    ServerClient,
    ServerLimits,
    TeacherServerError,
    completion_request,
    logprob_width,
)


class ServerTeacherScorer:
    """A teacher served elsewhere, scoring rollout batches over HTTP. `dtype` is the
    server's own business (its --dtype) and is not read."""

    def __init__(
        self,
        model: str,
        dtype: str = "float32",
        micro_batch_size: int = 64,
        url: str | None = None,
        limits: ServerLimits | None = None,
        name: str = "teacher",
    ) -> None:
        if model == SELF_TEACHER or not url:
            raise ValueError(SERVER_TEACHER_NEEDS_URL)
        if micro_batch_size < 1:
            raise ValueError(f"teacher.micro_batch_size must be >= 1, got {micro_batch_size}")
        self.model, self.micro_batch_size = model, micro_batch_size
        limits = limits or ServerLimits()
        self.client = ServerClient(url, name, limits)
        self.pool = ThreadPoolExecutor(limits.concurrency, thread_name_prefix="teacher-server")
        self._widths: dict[int, tuple[int, int | None]] = {}  # topk -> (K, V), asked once

    @staticmethod
    def supports(plan: RolloutPlan) -> str | None:
        return teacher_problem("server", plan)

    def score(self, batch: RolloutBatch, plan: RolloutPlan) -> RolloutBatch:
        """Teacher outputs for `batch`, with the seconds, scored tokens, payload bytes and
        the retried requests added to `extras`."""
        reason = teacher_problem("server", plan)
        if reason is not None:
            raise ValueError(cannot_run("teacher", "server", reason))
        if plan.teacher_need == "none":
            return batch
        started, retried = time.perf_counter(), self.client.retried
        k, vocab = self._width(plan.topk if plan.teacher_need == "topk" else 0)
        chunks = [
            batch.select(slice(start, start + self.micro_batch_size))
            for start in range(0, batch.size, self.micro_batch_size)
        ]
        parts = list(self.pool.map(lambda rows: self._score_rows(rows, plan, k, vocab), chunks))
        fields = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        scored = attach_outputs(batch, fields, plan.store_as)  # under its name: several teachers
        extras = {
            "teacher/seconds": time.perf_counter() - started,
            "teacher/tokens": batch.num_response_tokens,
            "teacher/payload_bytes": float(payload_bytes(scored)),
            "teacher/server_retries": float(self.client.retried - retried),
            **peak_metrics("teacher"),  # the client's process (the model runs on the server)
        }
        if plan.store_as is not None:  # several teachers, scored one after the other
            extras.update(named_extras(batch.extras, extras, plan.store_as))
        return scored.replace(extras={**scored.extras, **extras})

    def _width(self, topk: int) -> tuple[int, int | None]:
        """(K, V) for a top-k plan, asked of the server once per k; sampled needs neither."""
        if topk == 0:
            return 0, None
        if topk not in self._widths:
            self._widths[topk] = logprob_width(self.client, self.model, topk)
        return self._widths[topk]

    def _score_rows(
        self, rows: RolloutBatch, plan: RolloutPlan, k: int, vocab: int | None
    ) -> dict[str, torch.Tensor]:
        prompts = real_tokens(rows.prompt_ids, rows.prompt_mask)
        responses = real_tokens(rows.response_ids, rows.response_mask)
        sequences = [p + r for p, r in zip(prompts, responses)]
        answer = self.client.post("/v1/completions", completion_request(self.model, sequences, k))
        choices = sorted(answer.get("choices") or [], key=lambda choice: choice.get("index", 0))
        if len(choices) != len(sequences):
            raise TeacherServerError(
                f"teacher {self.client.name!r}: the server answered {len(choices)} choices for "
                f"{len(sequences)} prompts; is it an OpenAI-compatible completions server?"
            )
        scores = scores_from_choices(choices, prompts, responses, rows.response_mask, k, vocab)
        return outputs_from_scores(scores, rows, plan)


def scores_from_choices(
    choices: list[dict[str, Any]],
    prompts: list[list[int]],
    responses: list[list[int]],
    mask: torch.Tensor,
    k: int,
    vocab: int | None,
) -> dict[str, torch.Tensor]:
    """`score_sequences`' output (`sampled` [B,T]; with k, `topk_ids`/`topk_logprobs`
    [B,T,K] and `tail` [B,T]) from the server's `prompt_logprobs`: per prompt position a
    {token id: {logprob, rank}} map holding the scored token and the top-k (ranks 1..k)."""
    shape = mask.shape
    sampled = torch.zeros(shape)
    topk_ids = torch.zeros(*shape, k, dtype=torch.long)
    topk_logprobs = torch.full((*shape, k), -math.inf)
    for row, (prompt, response, choice) in enumerate(zip(prompts, responses, choices)):
        positions = choice.get("prompt_logprobs") or []
        for t, token in enumerate(response):
            candidates = positions[len(prompt) + t]
            sampled[row, t] = restore_inf(candidates[str(token)]["logprob"])
            if k:
                ids, values = ranked(candidates, k)
                if len(ids) != k:
                    raise TeacherServerError(
                        f"the teacher's server returned {len(ids)} candidates at a position "
                        f"where {k} were asked for; is it vLLM's OpenAI-compatible server?"
                    )
                topk_ids[row, t], topk_logprobs[row, t] = torch.tensor(ids), torch.tensor(values)
    out = {"sampled": sampled}
    if k:
        keep = mask.unsqueeze(-1)
        out["topk_ids"] = torch.where(keep, topk_ids, 0)
        out["topk_logprobs"] = torch.where(keep, topk_logprobs, 0.0)
        whole = k == vocab  # the top-k is the whole distribution: no tail, as in-process
        tail = torch.full(shape, -math.inf) if whole else tail_logprob(topk_logprobs)
        out["tail"] = torch.where(mask, tail, 0.0)
    return out


def ranked(candidates: dict[str, dict[str, Any]], k: int) -> tuple[list[int], list[float]]:
    """The top-k of one position in rank order. vLLM writes the scored token first and then
    the top-k with ranks 1..k, so k+1 entries mean the scored token is not among them (its
    own rank may tie one of theirs); k entries mean it is."""
    entries = list(candidates.items())
    if len(entries) == k + 1:
        entries = entries[1:]
    entries.sort(key=lambda item: item[1]["rank"])
    return [int(i) for i, _ in entries], [restore_inf(e["logprob"]) for _, e in entries]


def restore_inf(logprob: float) -> float:
    """vLLM writes −inf as SERVER_NEG_INF (JSON has no infinities); undone here so the
    numbers equal the in-process engine's."""
    return -math.inf if logprob <= SERVER_NEG_INF else float(logprob)
