"""`python -m protege.eval MODEL_DIR --data test.jsonl`: on the shipped student, on a run's
saved final model, and on bad input (one clear line, exit code 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from protege.eval.standalone import main
from protege.tasks import tiny


def test_shipped_student_with_teacher_and_samples(tmp_path, capsys):
    out = tmp_path / "metrics.json"
    argv = [
        tiny.student_path(),
        "--data",
        tiny.test_path(),
        "--limit",
        "24",
        "--samples",
        "2",
        "--teacher",
        tiny.teacher_path(),
        "--max-new-tokens",
        "6",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "reverse_kl" in printed
    metrics = json.loads(out.read_text())["metrics"]
    assert 0.0 <= metrics["accuracy"] <= 0.5  # the shipped student is weak (~10%)
    assert metrics["teacher_pass_at_1"] > 0.8
    assert metrics["forward_kl"] > 0 and metrics["reverse_kl"] > 0
    assert {"pass_at_1", "pass_at_2", "entropy", "self_bleu", "ece", "distinct_2"} <= metrics.keys()


def test_saved_final_model_of_a_run(tmp_path, capsys):
    from protege.config import load_config
    from protege.run import build_controller

    config = load_config(
        "gkd",
        [
            "trainer.workers=local",
            "logging.wandb=disabled",
            "logging.progress=false",
            f"output_dir={tmp_path / 'run'}",
            "trainer.steps=1",
            "trainer.batch_size=4",
            "data.test=null",
        ],
    )
    build_controller(config).run()
    assert (
        main(
            [
                str(tmp_path / "run" / "final"),
                "--data",
                "builtin:tiny/test",
                "--limit",
                "16",
                "--checker",
                "tiny",
            ]
        )
        == 0
    )
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing_dir", "is not a local model directory"),
        ("hub_id", "huggingface-cli download Qwen/Qwen3-0.6B --local-dir DIR"),
        ("not_a_model", "has no config.json"),
        ("malformed", "malformed JSON"),
        ("no_answers", "have no 'answer'"),
        ("missing_data", "no such data file"),
        ("bad_checker", "--checker"),
        ("bad_teacher", "--teacher"),
    ],
)
def test_bad_input_is_one_clear_line(case, message, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    model, extra = tiny.student_path(), []
    if case == "missing_dir":
        model = str(tmp_path / "nope")
    elif case == "hub_id":
        model = "Qwen/Qwen3-0.6B"
    elif case == "not_a_model":
        model = str(tmp_path)
    elif case == "malformed":
        data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": oops}\n')
    elif case == "no_answers":
        data.write_text('{"prompt": "1+1="}\n')
    elif case == "missing_data":
        data = tmp_path / "absent.jsonl"
    elif case == "bad_checker":
        extra = ["--checker", "nonexistent_module_xyz:check"]
    elif case == "bad_teacher":
        extra = ["--teacher", str(tmp_path / "nope"), "--samples", "1"]
    assert main([model, "--data", str(data), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err


@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "protege.eval", str(tmp_path / "missing"), "--data", "x.jsonl"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "is not a local model directory" in done.stderr
    assert done.stderr.count("\n") == 1  # one line
