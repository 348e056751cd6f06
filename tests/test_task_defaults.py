"""The built-in tiny task fills the config only when a run names no model or data of its
own; a user's run gets no built-in data (no test set, no pre-training text) unless asked."""

from __future__ import annotations

import json

import pytest

from protege.config import ConfigError, load_config
from protege.data import read_jsonl
from protege.run import result_line

OWN = ["student.model=/models/s", "teacher.model=/models/t", "data.train=/data/train.jsonl"]


def test_the_builtin_task_is_the_default_of_every_preset():
    for preset in ("gkd", "minillm", "opd", "gated_dual_kl", "kv_distill", "lora_self_distill"):
        config = load_config(preset)
        assert config.data.test == "builtin:tiny/test"
        assert config.data.pretrain == "builtin:tiny/pretrain"


def test_own_models_and_data_get_no_builtin_test_set_or_pretrain_text():
    config = load_config("minillm", OWN)
    assert config.data.test is None and config.data.pretrain is None
    assert config.student.model == "/models/s" and config.teacher.model == "/models/t"


def test_own_data_keeps_what_is_named_including_builtin_paths_on_purpose():
    config = load_config(
        "minillm", [*OWN, "data.test=/data/test.jsonl", "data.pretrain=builtin:tiny/pretrain"]
    )
    assert config.data.test == "/data/test.jsonl"
    assert config.data.pretrain == "builtin:tiny/pretrain"


@pytest.mark.parametrize(
    ("overrides", "missing"),
    [
        (["student.model=/models/s"], "data.train: not set"),
        (["teachers.0.model=/models/t"], "data.train: not set"),
        (OWN[:2], "data.train: not set"),
    ],
)
def test_a_half_named_run_is_refused_naming_the_missing_keys(overrides, missing):
    with pytest.raises(ConfigError, match=missing) as caught:
        load_config("gkd", overrides)
    assert "built-in tiny task" in str(caught.value)


def test_builtin_paths_and_the_self_teacher_stay_on_the_builtin_task():
    config = load_config("gkd", ["student.model=builtin:tiny/student_h32", "teacher.model=self"])
    assert config.data.test == "builtin:tiny/test"


def test_the_result_line_reports_what_was_measured():
    from protege.config import load_config as load

    config = load("gkd", ["trainer.steps=3"])
    accuracy = {"eval_before/accuracy": 0.1, "eval_after/accuracy": 0.4}
    assert result_line(config, accuracy).startswith(
        "student accuracy: 0.100 -> 0.400 (gkd, 3 steps"
    )
    kl = {"eval_before/reverse_kl": 9.25, "eval_after/reverse_kl": 2.5}
    assert result_line(config, kl).startswith("reverse KL to the teacher: 9.250 -> 2.500")
    assert "no evaluation: set data.test" in result_line(config, {})


def test_a_run_on_prompts_without_answers_ends_with_the_kl_to_its_teacher(tmp_path, capsys):
    """End to end with the user's own files (here copies of the tiny models' data without
    answers): evaluation measures KL to the teacher, the MiniLLM LM term stays off, and the
    last line reports KL before -> after, never an accuracy."""
    from protege.cli import run_example as main
    from protege.tasks import tiny

    rows = [{"prompt": row.prompt} for row in read_jsonl(tiny.train_path())][:64]
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[:48]))
    test.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[48:]))
    result = main(
        "minillm",
        [
            f"student.model={tiny.student_path()}",
            f"teacher.model={tiny.teacher_path()}",
            f"data.train={train}",
            f"data.test={test}",
            "trainer.workers=local",
            "trainer.steps=2",
            "trainer.batch_size=8",
            "logging.wandb=disabled",
            "logging.progress=false",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    assert "eval_before/accuracy" not in result
    assert result["eval_before/reverse_kl"] > 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("reverse KL to the teacher: ")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    steps = [r for r in metrics if "learner/loss" in r]
    assert steps and not [k for r in steps for k in r if "lm_loss" in k]  # no pre-training text
    assert [r["step"] for r in metrics if "eval_after/reverse_kl" in r] == [2]
