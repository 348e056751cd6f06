"""The console view: a bar with step k/N, the ETA and the key metrics on stderr; quiet off a
terminal or with logging.progress=false; the result line is the last thing printed."""

from __future__ import annotations

import io

import pytest

from protege.cli import run_example as main
from protege.progress import Progress, key_metrics, progress_enabled


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_draws_on_a_terminal_only_and_the_flag_overrides():
    assert progress_enabled("auto", Terminal()) and not progress_enabled("auto", io.StringIO())
    assert progress_enabled(True, io.StringIO()) and not progress_enabled(False, Terminal())


def test_the_bar_shows_step_of_total_eta_and_the_key_metrics():
    stream = Terminal()
    progress = Progress(4, enabled=True, stream=stream)
    for k in range(3):
        progress.update(k, {"step": k, "learner/loss": 0.5 - 0.1 * k, "time/step": 0.25})
    progress.close()
    last = stream.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("step 3/4 ") and "ETA " in last, last
    assert "loss=0.3" in last and "s/step=0.25" in last, last


def test_a_resumed_run_counts_from_its_start_step():
    stream = Terminal()
    progress = Progress(10, enabled=True, stream=stream)
    progress.update(6, {"learner/loss": 1.0})
    progress.close()
    assert "step 7/10" in stream.getvalue()


def test_disabled_prints_nothing():
    stream = Terminal()
    progress = Progress(3, enabled=False, stream=stream)
    progress.update(0, {"learner/loss": 1.0})
    progress.close()
    assert stream.getvalue() == ""


def test_key_metrics_names_only_what_the_row_has():
    assert key_metrics({"learner/loss": 0.123456, "other": 1}) == "loss=0.1235"


@pytest.mark.slow  # a whole (local) run
@pytest.mark.parametrize("progress", ["true", "false"])
def test_a_run_ends_with_the_result_line(tmp_path, capsys, progress):
    main(
        "gkd",
        [
            "trainer.workers=local", "logging.wandb=disabled", f"logging.progress={progress}",
            "trainer.steps=2", "trainer.batch_size=4", "trainer.eval_size=4",
            f"output_dir={tmp_path}",
        ],
    )  # fmt: skip
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1].startswith("student accuracy: ")
    bar = captured.err.replace("\r", "\n")
    assert ("step 2/2" in bar) == (progress == "true"), bar
    assert "Writing model shards" not in captured.err
