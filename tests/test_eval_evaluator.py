"""The Evaluator's bookkeeping over a scripted worker group, and in a real training run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from protege.data import Row
from protege.eval import metrics as m
from protege.evaluation import Evaluator
from protege.modeling import load_tokenizer
from protege.records import RolloutBatch, RolloutPlan


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:tiny/tokenizer")


ROWS = [Row("1+1=", answer="2"), Row("2+3=", answer="5")]


class ScriptedWorkers:
    """Answers like a Pipeline with fixed responses: greedy '2' and '4'; samples
    ['2','2','3'] for the first prompt and ['5','6','5'] for the second; the teacher writes
    the right answers."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.seconds = {"time/rollout": 1.0}
        self.plans: list[RolloutPlan] = []

    def greedy_texts(self, prompts, max_new_tokens):
        return ["2", "4"]

    def sample(self, prompts, plan):
        self.seconds["time/rollout"] += 5.0  # evaluation must not leak into step timings
        self.plans.append(plan)
        texts = (
            ["2"] * 3 + ["5"] * 3 if plan.source == "teacher" else ["2", "2", "3", "5", "6", "5"]
        )
        n = plan.samples_per_prompt
        answers = tuple(a for a in prompts.answers for _ in range(n))
        eos = self.tokenizer.eos_token_id
        ids = torch.tensor(
            [[*self.tokenizer(t, add_special_tokens=False)["input_ids"], eos] for t in texts]
        )
        logp = (
            torch.full(ids.shape, -0.5) if plan.source == "student" else torch.full(ids.shape, -0.1)
        )
        return RolloutBatch(
            prompt_ids=prompts.prompt_ids.repeat_interleave(n, 0),
            prompt_mask=prompts.prompt_mask.repeat_interleave(n, 0),
            response_ids=ids,
            response_mask=torch.ones_like(ids, dtype=torch.bool),
            behaviour_logprobs=logp,
            student_logprobs=torch.full(ids.shape, -0.5),
            answers=answers,
        )

    def score(self, batch, plan):
        return batch.replace(teacher_logprobs=torch.full(batch.response_ids.shape, -2.0))


def test_greedy_metrics(tokenizer):
    evaluator = Evaluator(ROWS, tokenizer, max_new_tokens=4)
    result = evaluator.run(ScriptedWorkers(tokenizer))
    assert result == {"accuracy": 0.5, "response_length": 1.0, "distinct_1": 1.0, "distinct_2": 0.0}
    assert evaluator.last_correct == [True, False]


def test_sampled_and_teacher_metrics(tokenizer):
    workers = ScriptedWorkers(tokenizer)
    result = Evaluator(ROWS, tokenizer, max_new_tokens=4, samples=3, teacher_kl=True).run(workers)
    hits = [[True, True, False], [True, False, True]]
    assert result["pass_at_1"] == pytest.approx(m.mean_pass_at_k(hits, 1)) == pytest.approx(4 / 6)
    assert result["pass_at_3"] == 1.0
    assert result["entropy"] == pytest.approx(0.5)
    assert result["sample_response_length"] == 2.0  # one digit + EOS
    assert result["sample_distinct_1"] == pytest.approx(4 / 6)  # 2 3 5 6 among six digits
    confidence = [math.exp(-1.0)] * 6
    assert result["ece"] == pytest.approx(
        m.expected_calibration_error(confidence, [h for row in hits for h in row])
    )
    assert result["self_bleu"] == pytest.approx(m.self_bleu([[[6], [6], [7]], [[9], [10], [9]]]))
    assert result["reverse_kl"] == pytest.approx(-0.5 + 2.0)
    assert result["forward_kl"] == pytest.approx(-0.1 + 0.5)
    assert result["teacher_pass_at_1"] == 1.0
    assert [p.source for p in workers.plans] == ["student", "teacher"]
    assert workers.seconds == {"time/rollout": 1.0}


def test_teacher_kl_needs_samples_and_rows_need_all_answers_or_none(tokenizer):
    with pytest.raises(ValueError, match="eval_samples"):
        Evaluator(ROWS, tokenizer, 4, teacher_kl=True)
    with pytest.raises(ValueError, match="1 of 2 evaluation rows have no 'answer'"):
        Evaluator([Row("1+1=", answer="2"), Row("2+2=")], tokenizer, 4)


def test_rows_without_answers_measure_the_distance_to_the_teacher(tokenizer):
    """A user's own prompts have nothing to check: one sample per prompt, scored by the
    teacher; no accuracy (which would read 0) and no greedy pass."""
    workers = ScriptedWorkers(tokenizer)
    workers.greedy_texts = None  # must not be called
    rows = [Row("1+1="), Row("2+3=")]
    result = Evaluator(rows, tokenizer, max_new_tokens=4).run(workers)
    assert result["reverse_kl"] == pytest.approx(-0.5 + 2.0)
    assert not {"accuracy", "pass_at_1", "ece", "teacher_pass_at_1", "forward_kl"} & set(result)
    assert [(p.source, p.samples_per_prompt) for p in workers.plans] == [("student", 1)]
    asked = Evaluator(rows, tokenizer, 4, samples=1, teacher_kl=True).run(workers)
    assert asked["forward_kl"] == pytest.approx(-0.1 + 0.5)  # teacher-written, when asked


def test_training_run_logs_extended_eval_metrics(tmp_path):
    from protege.config import load_config
    from protege.run import build_controller

    config = load_config(
        "gkd",
        [
            "trainer.workers=local",
            "logging.wandb=disabled",
            "logging.progress=false",
            f"output_dir={tmp_path}",
            "trainer.steps=2",
            "trainer.batch_size=4",
            "trainer.eval_every=1",
            "trainer.eval_size=8",
            "trainer.eval_samples=2",
            "trainer.eval_teacher_kl=true",
        ],
    )
    result = build_controller(config).run()
    for key in ("accuracy", "pass_at_2", "entropy", "self_bleu", "ece", "reverse_kl", "forward_kl"):
        assert f"eval_after/{key}" in result and math.isfinite(result[f"eval_after/{key}"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if "eval/pass_at_2" in r] == [0, 1]
    step_rows = [r for r in rows if "learner/loss" in r]
    assert all("eval/accuracy" not in r for r in step_rows)
