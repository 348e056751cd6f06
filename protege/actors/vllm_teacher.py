"""Teacher scoring on the vLLM backend: the same interface as `TeacherScorer`.

One prefill per (prompt, response) row with vLLM prompt log-probs at temperature 1 gives
the teacher's log-prob of every response token (`sampled`) or its top-k per position
(`topk`, with the tail mass from the top-k). Candidates are never detokenised (the engine
runs without a tokenizer, and log-probs come back as flat lists), which keeps the Python
side cheap at large k. Shapes: B rows, T response tokens, K top-k.
"""

from __future__ import annotations

import torch

from protege.actors.vllm_engine import make_engine, outputs_from_scores, score_sequences
from protege.capabilities import (
    SELF_TEACHER_HAS_NO_SCORER,
    cannot_run,
    teacher_problem,
)
from protege.config import SELF_TEACHER
from protege.privileged import scored_on_view
from protege.records import RolloutBatch, RolloutPlan
from protege.teacher_payload import attach_outputs


class VLLMTeacherScorer:
    """A frozen teacher in an in-process vLLM engine that scores rollout batches."""

    def __init__(self, model: str, dtype: str = "float32", micro_batch_size: int = 64) -> None:
        if model == SELF_TEACHER:
            raise ValueError(SELF_TEACHER_HAS_NO_SCORER)
        if micro_batch_size < 1:
            raise ValueError(f"teacher.micro_batch_size must be >= 1, got {micro_batch_size}")
        # vLLM batches internally; rows are submitted `micro_batch_size` at a time only to
        # bound the Python-side log-prob lists.
        self.micro_batch_size = micro_batch_size
        self.llm = make_engine(
            model, dtype, seed=0, gpu_memory_utilization=0.4, skip_tokenizer_init=True
        )

    @property
    def vocab_size(self) -> int:
        return int(self.llm.llm_engine.model_config.get_vocab_size())

    @staticmethod
    def supports(plan: RolloutPlan) -> str | None:
        return teacher_problem("vllm", plan)

    def score(self, batch: RolloutBatch, plan: RolloutPlan) -> RolloutBatch:
        reason = teacher_problem("vllm", plan)
        if reason is not None:
            raise ValueError(cannot_run("teacher", "vllm", reason))
        if plan.teacher_need == "none":
            return batch
        return scored_on_view(batch, plan, lambda view: self._score(view, plan))

    def _score(self, batch: RolloutBatch, plan: RolloutPlan) -> RolloutBatch:
        topk = plan.topk if plan.teacher_need == "topk" else 0
        parts = []
        for start in range(0, batch.size, self.micro_batch_size):
            rows = batch.select(slice(start, start + self.micro_batch_size))
            parts.append(outputs_from_scores(score_sequences(self.llm, rows, topk), rows, plan))
        fields = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        return attach_outputs(batch, fields, plan.store_as)
