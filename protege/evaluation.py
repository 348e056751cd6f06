"""Held-out evaluation of the current student through the rollout workers.

Always (cheap): greedy exact-match `accuracy`, greedy `response_length` and `distinct_1/2`.
With `samples` = k > 0: k sampled responses per prompt give `pass_at_1`, `pass_at_k`,
`entropy` (nats/token), `sample_distinct_1/2`, `self_bleu`, `ece` (calibration of the
sequence probability against correctness) and `sample_response_length`. With `teacher_kl`
as well: `reverse_kl` KL(q_θ‖p_T) on the student's samples and `forward_kl` KL(p_T‖q_θ) on
teacher-written ones (per token, Monte Carlo; exact in expectation at rollout temperature 1).

Rows without answers (a user's own prompts): no greedy pass, and the sampled metrics are
always on with the reverse KL (at least one sample per prompt), so the run reports how far
the student is from its teacher before and after training at the cost of one training
rollout of those prompts; forward KL too with `teacher_kl` (trainer.eval_teacher_kl).

`workers` is anything with the Pipeline's `greedy_texts`, `sample` and `score`: the
training run's Pipeline, or `protege.eval.standalone.LocalModels` for a saved model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase

from protege.data import DataError, PromptSource, Row
from protege.errors import SetupError
from protege.eval import metrics as m
from protege.records import RolloutBatch, RolloutPlan

Checker = Callable[[str, str], bool]


def exact_match(prediction: str, answer: str) -> bool:
    """The generated text (up to EOS, special tokens dropped) equals the answer, stripped."""
    return prediction.strip() == answer.strip()


def _answered(rows: list[Row]) -> bool:
    """Whether the rows carry answers: all of them (accuracy) or none (teacher agreement
    only); a mix is refused."""
    missing = [i for i, row in enumerate(rows, start=1) if row.answer is None]
    if missing and len(missing) < len(rows):
        first = rows[missing[0] - 1].where or f"row {missing[0]}"
        raise DataError(
            f"{first}: {len(missing)} of {len(rows)} evaluation rows have no 'answer'; give "
            "every data.test row one (accuracy), or none (KL to the teacher is measured)"
        )
    return not missing


class Evaluator:
    """Task and distribution metrics of the current student on `rows`. With answers:
    accuracy and the rest; without: the student's reverse (and forward) KL to the teacher
    on its own samples, entropy and length."""

    def __init__(
        self,
        rows: list[Row],
        tokenizer: PreTrainedTokenizerBase,
        max_new_tokens: int,
        checker: Checker = exact_match,
        chat_template: bool = False,
        samples: int = 0,
        teacher_kl: bool = False,
        forward_kl: bool = True,
        max_prompt_tokens: int = 256,
        overlong: str = "truncate_left",
        system_prompt: str | None = None,
    ):
        self.has_answers = _answered(rows)
        if samples < 0:
            raise SetupError(f"trainer.eval_samples must be >= 0, got {samples}")
        if teacher_kl and samples == 0:
            raise SetupError(
                "teacher_kl needs sampled responses: set samples (trainer.eval_samples) >= 1"
            )
        if not self.has_answers:  # nothing to check: measure the distance to the teacher
            # reverse KL costs what a training rollout of these prompts costs (student samples,
            # teacher scores); forward KL (teacher-written samples) only when asked for
            forward_kl = forward_kl and teacher_kl
            samples, teacher_kl = max(samples, 1), True
        self.rows, self.max_new_tokens, self.checker = rows, max_new_tokens, checker
        self.tokenizer, self.samples = tokenizer, samples
        self.teacher_kl, self.forward_kl = teacher_kl, forward_kl and teacher_kl
        self.special_ids = frozenset(tokenizer.all_special_ids)
        # Test prompts are never dropped (the accuracy would be over another set): `drop`
        # truncates them instead.
        source = PromptSource(
            rows,
            tokenizer,
            batch_size=len(rows),
            chat_template=chat_template,
            max_prompt_tokens=max_prompt_tokens,
            overlong="truncate_left" if overlong == "drop" else overlong,
            system_prompt=system_prompt,
        )
        self.prompts = source.next(step=0)
        self.last_correct: list[bool] = []

    @classmethod
    def from_config(
        cls, rows: list[Row], tokenizer: PreTrainedTokenizerBase, config, chat_template: bool
    ) -> Evaluator:
        """The evaluator a training run uses (`trainer.eval_*` keys; `chat_template` as
        resolved for the training prompts)."""
        return cls(
            rows,
            tokenizer,
            config.rollout.max_new_tokens,
            chat_template=chat_template,
            system_prompt=config.data.system_prompt,
            samples=config.trainer.eval_samples,
            teacher_kl=config.trainer.eval_teacher_kl,
            # the self-teacher and a teacher on a server cannot write responses
            forward_kl=not (config.teacher.is_self or config.teacher.on_server),
            max_prompt_tokens=config.data.max_prompt_tokens,
            overlong=config.data.overlong,
        )

    def run(self, workers) -> dict[str, float]:
        seconds = dict(getattr(workers, "seconds", {}))  # evaluation is not a training phase
        try:
            result = self.greedy_metrics(workers) if self.has_answers else {}
            if self.samples:
                result.update(self.sampled_metrics(workers))
            return result
        finally:
            if hasattr(workers, "seconds"):
                workers.seconds = seconds

    def greedy_metrics(self, workers) -> dict[str, float]:
        texts = workers.greedy_texts(self.prompts, self.max_new_tokens)
        correct = [self.checker(t, a) for t, a in zip(texts, self.prompts.answers)]
        self.last_correct = correct  # per-example, for paired comparisons across runs
        tokens = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return {
            "accuracy": sum(correct) / len(texts),
            "response_length": sum(map(len, tokens)) / len(tokens),
            "distinct_1": m.distinct_n(tokens, 1),
            "distinct_2": m.distinct_n(tokens, 2),
        }

    def sampled_metrics(self, workers) -> dict[str, float]:
        k = self.samples
        need = "sampled" if self.teacher_kl else "none"
        plan = RolloutPlan(source="student", teacher_need=need, samples_per_prompt=k)
        batch = workers.sample(self.prompts, plan)
        correct, tokens = self._judge(batch)
        groups = [tokens[i : i + k] for i in range(0, len(tokens), k)]
        mask = batch.response_mask
        result = {
            "entropy": m.sampled_token_entropy(batch.student_logprobs, mask),
            "sample_distinct_1": m.distinct_n(tokens, 1),
            "sample_distinct_2": m.distinct_n(tokens, 2),
            "self_bleu": m.self_bleu(groups) if k > 1 else float("nan"),
            "sample_response_length": batch.num_response_tokens / batch.size,
        }
        if self.has_answers:
            result.update(self._correctness(batch, correct))
        if self.teacher_kl:
            result.update(self._teacher_agreement(workers, batch, plan))
        return {key: value for key, value in result.items() if not math.isnan(value)}

    def _correctness(self, batch: RolloutBatch, correct: list[bool]) -> dict[str, float]:
        k = self.samples
        hits = [correct[i : i + k] for i in range(0, len(correct), k)]
        confidence = m.sequence_confidence(batch.student_logprobs, batch.response_mask)
        result = {
            "pass_at_1": m.mean_pass_at_k(hits, 1),
            "ece": m.expected_calibration_error(confidence.tolist(), correct),
        }
        if k > 1:
            result[f"pass_at_{k}"] = m.mean_pass_at_k(hits, k)
        return result

    def _teacher_agreement(
        self, workers, batch: RolloutBatch, plan: RolloutPlan
    ) -> dict[str, float]:
        scored = workers.score(batch, plan)
        result = {
            "reverse_kl": m.sampled_kl_per_token(
                batch.student_logprobs, scored.teacher_logprobs, batch.response_mask
            )
        }
        if self.forward_kl:
            teacher_plan = RolloutPlan(
                source="teacher", teacher_need="none", samples_per_prompt=self.samples
            )
            written = workers.sample(self.prompts, teacher_plan)
            result["forward_kl"] = m.sampled_kl_per_token(
                written.behaviour_logprobs, written.student_logprobs, written.response_mask
            )
            if self.has_answers:
                result["teacher_pass_at_1"] = sum(self._judge(written)[0]) / written.size
        return result

    def _judge(self, batch: RolloutBatch) -> tuple[list[bool], list[list[int]]]:
        """Correctness and content token ids (special tokens dropped) of each response."""
        ids = torch.where(batch.response_mask, batch.response_ids, self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        correct = [self.has_answers and self.checker(t, a) for t, a in zip(texts, batch.answers)]
        tokens = [
            [
                t
                for t, keep in zip(row.tolist(), mask.tolist())
                if keep and t not in self.special_ids
            ]
            for row, mask in zip(batch.response_ids, batch.response_mask)
        ]
        return correct, tokens
