"""Teacher scoring on the vLLM backend: the same interface as `TeacherScorer`.

One prefill per (prompt, response) row with vLLM prompt log-probs at temperature 1 gives
the teacher's log-prob of every response token (`sampled`) or its top-k per position
(`topk`, with the tail mass from the top-k). Candidates are never detokenised (the engine
runs without a tokenizer, and log-probs come back as flat lists), which keeps the Python
side cheap at large k. Shapes: B rows, T response tokens, K top-k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from protege.actors.backends import teacher_problem
from protege.actors.vllm_engine import make_engine, score_sequences
from protege.records import RolloutBatch, RolloutPlan


def outputs_from_scores(
    scores: dict[str, Tensor], batch: RolloutBatch, plan: RolloutPlan
) -> dict[str, Tensor]:
    """RolloutBatch teacher fields from `score_sequences`' output."""
    mask = batch.response_mask
    fields = {"teacher_logprobs": scores["sampled"].masked_fill(~mask, 0.0)}
    if plan.teacher_need == "topk":
        fields["teacher_topk_ids"] = scores["topk_ids"]
        fields["teacher_topk_logprobs"] = scores["topk_logprobs"]
        fields["teacher_tail_logprobs"] = scores["tail"]
    return fields


class VLLMTeacherScorer:
    """A frozen teacher in an in-process vLLM engine that scores rollout batches."""

    def __init__(self, model: str, dtype: str = "float32", micro_batch_size: int = 64) -> None:
        if model == "self":
            raise ValueError(
                "teacher.model='self' is scored by the student's own base model (the learner, or "
                "the vLLM rollout engine with no adapter); no teacher scorer is needed"
            )
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
            raise ValueError(f"the vLLM teacher cannot score this plan: {reason}")
        if plan.teacher_need == "none":
            return batch
        topk = plan.topk if plan.teacher_need == "topk" else 0
        parts = []
        for start in range(0, batch.size, self.micro_batch_size):
            rows = batch.select(slice(start, start + self.micro_batch_size))
            parts.append(outputs_from_scores(score_sequences(self.llm, rows, topk), rows, plan))
        fields = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        return batch.replace(**fields)
