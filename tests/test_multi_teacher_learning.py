"""Learning tier (slow): a student routed between two specialist teachers learns the task."""

from __future__ import annotations

import pytest

from protege.config import load_config
from protege.run import build_controller


@pytest.mark.slow
def test_routed_student_learns_from_two_specialists(tmp_path):
    config = load_config(
        "multi_teacher",
        [
            "trainer.workers=local",
            "logging.wandb=disabled",
            "logging.progress=false",
            "trainer.steps=150",
            "trainer.eval_size=100",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    result = build_controller(config).run()
    assert result["eval_after/accuracy"] >= result["eval_before/accuracy"] + 0.1, result
