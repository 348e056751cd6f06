"""An algorithm's own trainable modules: built in the learner, trained by the same engine as
the student, saved in its checkpoints and restored exactly by a resume."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from protege.actors.learner import Learner
from protege.algorithms.divergences import jsd_from_logprobs, masked_mean
from protege.algorithms.registry import ALGORITHMS, AlgorithmDefaults, ModuleContext, register
from protege.algorithms.teacher_view import paired_logprobs
from protege.config import config_from_dict
from protege.records import RolloutPlan
from tests.test_learner import make_batch


class LogTemperature(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.value = torch.nn.Parameter(torch.zeros(1))  # DeepSpeed cannot hold 0-dim parameters


if "learned_temperature" not in ALGORITHMS:

    @register("learned_temperature")
    @dataclass(frozen=True)
    class LearnedTemperature(AlgorithmDefaults):
        """Forward KL from the teacher to the student's logits divided by a learned
        temperature (a toy with one trainable scalar outside the student)."""

        def plan(self, step: int) -> RolloutPlan:
            return RolloutPlan(teacher_need="full")

        def modules(self, context: ModuleContext) -> dict[str, torch.nn.Module]:
            assert context.student_config.vocab_size > 0  # the context carries the shapes
            return {"temperature": LogTemperature()}

        def loss(self, student, batch):
            scale = student.modules["temperature"].value.exp()
            logp, teacher = paired_logprobs(student.logits / scale, batch)
            per_token = jsd_from_logprobs(logp, teacher, 0.0)
            loss = masked_mean(per_token, batch.response_mask, batch.normaliser())
            return loss, {"toy/loss": loss.item()}


def config(tiny_dirs):
    return config_from_dict(
        {
            "student": {"model": tiny_dirs["student"]},
            "teacher": {"model": tiny_dirs["teacher"]},
            "learner": {"lr": 5e-2, "micro_batch_size": 2},
            "algorithm": {"name": "learned_temperature"},
            "trainer": {"steps": 10},
            "data": {"train": "builtin:tiny/train"},
        }
    )


def temperature(learner: Learner) -> float:
    return float(learner.algorithm_modules["temperature"].value)


def test_modules_train_checkpoint_and_resume(tiny_dirs, tmp_path):
    batches = [make_batch(tiny_dirs, seed=s) for s in range(3)]
    original = Learner(config(tiny_dirs))
    assert temperature(original) == 0.0
    original.train(batches[0]), original.train(batches[1])
    assert temperature(original) != 0.0  # the engine's optimizer steps it
    original.save_checkpoint(str(tmp_path / "ckpt"))
    saved = temperature(original)
    expected = original.train(batches[2])

    resumed = Learner(config(tiny_dirs))
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    assert temperature(resumed) == saved
    metrics = resumed.train(batches[2])
    assert metrics["toy/loss"] == expected["toy/loss"]
    assert temperature(resumed) == temperature(original)
    # The samplers only ever receive the student's weights.
    assert not any("temperature" in name for name in resumed.export_weights().tensors)


def test_modules_start_the_same_on_every_rank(tiny_dirs):
    first, second = Learner(config(tiny_dirs)), Learner(config(tiny_dirs))
    assert temperature(first) == temperature(second) == pytest.approx(0.0)
