"""End-to-end runs of every preset with all roles in-process (the same WorkerGroup and
Controller code that drives Ray actors), plus the bad inputs the pipeline must refuse."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from protege.config import load_config
from protege.data import DataError
from protege.modeling import resolve_path, response_logits
from protege.records import RolloutBatch, RolloutPlan
from protege.run import build_controller

PRESETS = ["gkd", "minillm", "gated_dual_kl", "rl_distill", "opd", "lora_self_distill"]


def local_config(preset: str, tmp_path, *overrides: str):
    base = [
        "trainer.workers=local",
        "logging.wandb=disabled",
        "logging.progress=false",
        f"output_dir={tmp_path / 'run'}",
        "trainer.eval_size=16",
    ]
    return load_config(preset, [*base, *overrides])


def read_metrics(config) -> list[dict]:
    path = f"{config.output_dir}/metrics.jsonl"
    with open(path) as lines:
        return [json.loads(line) for line in lines]


def logprobs_of(model_dir: str, batch: RolloutBatch) -> torch.Tensor:
    """[B,T] log-probs (temperature 1) of the batch's response tokens under a saved model."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = response_logits(model, batch).float()
    return torch.log_softmax(logits, -1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_and_writes_metrics(preset, tmp_path):
    config = local_config(preset, tmp_path, "trainer.steps=2", "trainer.batch_size=4")
    controller = build_controller(config)
    result = controller.run()

    rows = [r for r in read_metrics(config) if r["step"] >= 0 and "learner/loss" in r]
    assert [r["step"] for r in rows] == [0, 1]
    for row in rows:
        for key in ("time/rollout", "time/learner", "time/sync"):  # every preset does these
            assert 0 < row[key] < row["time/step"], key
        for key in ("time/teacher", "time/reward"):  # zero where the preset has none
            assert 0 <= row[key] < row["time/step"], key
        assert all(isinstance(v, (int, float)) for v in row.values())
    assert 0.0 <= result["eval_after/accuracy"] <= 1.0
    # the samplers hold the trained weights: what they sample now is scored as the saved
    # final model scores it, and not as the initial student does
    batch = controller.pipeline.sample(controller.prompts.next(2), RolloutPlan())
    assert batch.weights_version == 2
    mask = batch.response_mask
    final = logprobs_of(f"{config.output_dir}/final", batch)
    torch.testing.assert_close(batch.student_logprobs[mask], final[mask], atol=1e-4, rtol=0)
    initial = logprobs_of(resolve_path(config.student.model), batch)
    assert not torch.allclose(batch.student_logprobs[mask], initial[mask], atol=1e-4), (
        "sync did not change the sampler"
    )


def test_resume_reproduces_the_uninterrupted_trajectory(tmp_path):
    common = ["trainer.batch_size=4", "trainer.save_every=2", "data.test=null"]
    full = local_config("minillm", tmp_path / "a", "trainer.steps=4", *common)
    build_controller(full).run()
    first = local_config("minillm", tmp_path / "b", "trainer.steps=2", *common)
    build_controller(first).run()
    resumed = local_config(
        "minillm", tmp_path / "b", "trainer.steps=4", "trainer.resume=true", *common
    )
    build_controller(resumed).run()

    expected = {r["step"]: r["learner/loss"] for r in read_metrics(full) if "learner/loss" in r}
    got = {r["step"]: r["learner/loss"] for r in read_metrics(resumed) if "learner/loss" in r}
    assert got.keys() == expected.keys()
    for step in (2, 3):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)


def test_teacher_with_another_vocabulary_is_refused(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from protege.tasks.tiny_models import build_char_tokenizer

    other = tmp_path / "other_teacher"
    model = AutoModelForCausalLM.from_pretrained(_teacher_dir())
    model.save_pretrained(other)
    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens(["@"])
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    tokenizer.save_pretrained(other)
    config = local_config(
        "gkd", tmp_path, f"teacher.model={other}", "data.train=builtin:tiny/train"
    )
    with pytest.raises(
        ValueError,
        match=r"different tokenizers \(0 tokens only in the student's; 1 only in the teacher's \(e.g. '@'\)",
    ):
        build_controller(config)


def _teacher_dir() -> str:
    return resolve_path("builtin:tiny/teacher")


def test_malformed_jsonl_names_the_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2=", oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        build_controller(local_config("gkd", tmp_path, f"data.train={data}"))


def test_empty_jsonl_is_refused(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        build_controller(local_config("opd", tmp_path, f"data.train={data}"))


def test_missing_completion_when_dataset_responses_are_needed(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    config = local_config(
        "gkd", tmp_path, f"data.train={data}", "algorithm.lmbda=0.5", "trainer.steps=10"
    )
    with pytest.raises(DataError, match="row 1 has no 'completion'"):
        build_controller(config)


def test_prompt_only_data_is_fine_for_on_policy_algorithms(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "3+4=", "answer": "7"}\n')
    config = local_config(
        "opd", tmp_path, f"data.train={data}", "trainer.steps=1", "trainer.batch_size=2"
    )
    build_controller(config).run()
    assert any("learner/loss" in r for r in read_metrics(config))


def test_self_teacher_without_lora_is_refused(tmp_path):
    with pytest.raises(ValueError, match="student.lora.enabled"):
        build_controller(local_config("gkd", tmp_path, "teacher.model=self"))
