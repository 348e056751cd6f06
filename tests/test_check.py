"""`protege check`: the dry-run checks pass on a sound run and catch an injected fault."""

from __future__ import annotations

import pytest
import torch

from protege import check
from protege.cli import main as cli

FAST = ["trainer.batch_size=4", "rollout.max_new_tokens=4"]


def test_a_sound_run_passes_every_check(capsys):
    assert cli(["check", "gkd", *FAST]) == 0
    out = capsys.readouterr().out
    for name in ("teacher determinism", "sampler vs learner log-probs", "self-distillation loss"):
        assert f"ok   {name}" in out
    assert "ok   one training step" in out and "peak memory learner" in out


def test_teacher_outputs_shifted_by_one_position_fail_the_self_test(monkeypatch, capsys):
    """The classic off-by-one: logits that predict the token after the one scored."""
    from protege.actors import teacher

    original = teacher.response_logits

    def shifted(model, batch):
        return torch.roll(original(model, batch), shifts=1, dims=1)

    monkeypatch.setattr(teacher, "response_logits", shifted)
    findings = {f.name: f for f in check.run_checks(check.load_config("gkd", FAST), say=print)}
    assert not findings["self-distillation loss"].ok
    assert "misaligned" in findings["self-distillation loss"].detail
    assert not findings["sampler vs learner log-probs"].ok
    assert findings["teacher determinism"].ok


def test_a_bad_config_is_one_error_and_exit_code_2(capsys):
    assert cli(["check", "gkd", "trainer.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "did you mean 'steps'" in err


@pytest.mark.parametrize("argv", [[], ["--help"], ["check"]])
def test_usage(argv, capsys):
    code = cli(argv)
    assert code == (2 if not argv else 0)
    captured = capsys.readouterr()
    assert "protege check PRESET" in captured.out + captured.err or "protege check" in captured.out


def test_a_response_past_the_models_positions_is_refused_at_start_up():
    """The tiny models have 64 positions; 2-digit sums are ~7 tokens."""
    from protege.errors import SetupError
    from protege.run import build_controller

    config = check.check_config(check.load_config("gkd", ["rollout.max_new_tokens=60"]))
    with pytest.raises(SetupError, match=r"student.model: .* has 64 positions, but the longest"):
        build_controller(config)
