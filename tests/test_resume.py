"""Resume semantics and numerics over whole in-process runs (`trainer.workers=local`): a
used output_dir is never silently reused, a resume refuses another model, algorithm or
changed hyper-parameters, metrics.jsonl holds each step once, a tampered checkpoint is
skipped, and a run whose numerics broke stops without saving anything from them."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import pytest
import torch

from protege.algorithms.divergences import masked_mean
from protege.algorithms.registry import ALGORITHMS, AlgorithmDefaults, register
from protege.checkpoint import CheckpointError, verify
from protege.config import load_config
from protege.controller import Interrupted, TrainingStopped
from protege.records import RolloutPlan
from protege.resume import config_changes, config_hash, saved_config
from protege.run import build_controller


@dataclass(frozen=True)
class NLLStep:
    scale: float

    def loss(self, student, batch):
        nll = -torch.log_softmax(student.logits, -1).gather(-1, batch.response_ids[..., None])
        loss = self.scale * masked_mean(nll[..., 0], batch.response_mask, batch.normaliser())
        return loss, {}


if "nan_from" not in ALGORITHMS:

    @register("nan_from")
    @dataclass(frozen=True)
    class NaNFrom(AlgorithmDefaults):
        """NLL of the dataset responses; the loss is NaN from step `bad_from` on."""

        bad_from: int = 1000

        def plan(self, step: int) -> RolloutPlan:
            return RolloutPlan(source="dataset", teacher_need="sampled")

        def loss_for(self, step: int) -> NLLStep:
            return NLLStep(float("nan") if step >= self.bad_from else 1.0)

        def loss(self, student, batch):
            return NLLStep(1.0).loss(student, batch)


def local(out, *overrides: str):
    base = [
        "algorithm.name=nan_from",
        "trainer.workers=local",
        "logging.wandb=disabled",
        "logging.progress=false",
        "data.test=null",
        "trainer.batch_size=4",
        f"output_dir={out}",
    ]
    return load_config(None, [*base, *overrides])


def rows(out) -> list[dict]:
    with open(f"{out}/metrics.jsonl") as lines:
        return [json.loads(line) for line in lines]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["learner/loss"] for r in rows(out) if "learner/loss" in r}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 3-step run with checkpoints after steps 1 and 3 (step_2 is its resume point when
    step_4's is broken), copied by each test that changes it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    build_controller(local(out, "trainer.steps=4", "trainer.save_every=2")).run()
    return out


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_a_fresh_run_into_a_used_output_dir_is_refused_until_overwrite(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    with pytest.raises(CheckpointError, match=r"trainer.overwrite=true .* trainer.resume=auto"):
        build_controller(local(out, "trainer.steps=1"))
    build_controller(local(out, "trainer.steps=1", "trainer.overwrite=true")).run()
    assert list(losses(out)) == [0]  # the old run's rows are gone
    assert not (out / "checkpoints").exists()


def test_resume_true_without_a_complete_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint.*trainer.resume=auto"):
        build_controller(local(tmp_path / "run", "trainer.resume=true"))


def test_resume_auto_continues_the_run_and_logs_each_step_once(tmp_path):
    out = tmp_path / "run"
    build_controller(
        local(out, "trainer.steps=3", "trainer.save_every=2", "trainer.resume=auto")
    ).run()
    uninterrupted = losses(out)  # steps 0, 1, 2: step 2 ran after the checkpoint
    resumed = build_controller(
        local(out, "trainer.steps=4", "trainer.save_every=2", "trainer.resume=auto")
    )
    assert resumed.resume_from.name == "step_0000002"
    resumed.run()
    steps = [r["step"] for r in rows(out) if "learner/loss" in r]
    assert steps == [0, 1, 2, 3]  # step 2 once: the first run's row was cut back
    assert losses(out)[2] == pytest.approx(uninterrupted[2], rel=1e-6)


@pytest.mark.parametrize(
    "override, refusal",
    [
        (
            "student.model=builtin:tiny/teacher",
            r"student.model='builtin:tiny/student'.*'builtin:tiny/teacher'",
        ),
        ("algorithm.name=gkd", r"algorithm.name='nan_from'.*'gkd'"),
        (
            "learner.lr=0.5",
            r"changed hyper-parameters: learner.lr: 0.001 -> 0.5.*resume_allow_changes",
        ),
    ],
)
def test_resume_refuses_another_model_algorithm_or_changed_hyperparameters(
    finished_run, override, refusal
):
    with pytest.raises(CheckpointError, match=refusal):
        build_controller(local(finished_run, "trainer.steps=6", "trainer.resume=true", override))


def test_changed_hyperparameters_resume_with_resume_allow_changes(finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    config = local(
        out,
        "trainer.steps=5",
        "trainer.resume=true",
        "learner.lr=0.002",
        "trainer.resume_allow_changes=true",
    )
    build_controller(config).run()
    assert "learner.lr: 0.001 -> 0.002" in capsys.readouterr().err
    assert list(losses(out)) == [0, 1, 2, 3, 4]


def test_a_checkpoint_that_predates_a_setting_resumes_and_names_it(finished_run, tmp_path, capsys):
    """An older protege wrote no `learner.loss_chunk_tokens`: resuming takes this run's value
    and says so, without asking for trainer.resume_allow_changes (a changed one still does)."""
    out = copy_of(finished_run, tmp_path)
    for manifest in (out / "checkpoints").glob("step_*/manifest.json"):
        record = json.loads(manifest.read_text())
        del record["config"]["learner"]["loss_chunk_tokens"]
        manifest.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="learner.lr: 0.001 -> 0.5"):
        build_controller(local(out, "trainer.steps=5", "trainer.resume=true", "learner.lr=0.5"))
    build_controller(local(out, "trainer.steps=5", "trainer.resume=true")).run()
    err = capsys.readouterr().err
    assert (
        "predates these settings, which take this run's values: learner.loss_chunk_tokens='auto'"
        in err
    )
    assert list(losses(out)) == [0, 1, 2, 3, 4]


def test_a_tampered_checkpoint_is_skipped_for_the_previous_one(finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    model_file = next((out / "checkpoints" / "step_0000004" / "learner").rglob("*model_states.pt"))
    model_file.write_bytes(model_file.read_bytes() + b"payload")  # never unpickled now
    controller = build_controller(local(out, "trainer.steps=4", "trainer.resume=auto"))
    assert controller.resume_from.name == "step_0000002"
    assert "model_states.pt" in capsys.readouterr().err
    controller.run()
    assert list(losses(out)) == [0, 1, 2, 3]
    assert losses(out) == pytest.approx(losses(finished_run), rel=1e-6)


def test_keep_last_keeps_the_newest_checkpoints(tmp_path):
    out = tmp_path / "run"
    build_controller(
        local(out, "trainer.steps=3", "trainer.save_every=1", "trainer.keep_last=2")
    ).run()
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_0000002", "step_0000003"]
    assert all(verify(out / "checkpoints" / name) is None for name in names)


def test_nonfinite_losses_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    config = local(
        out,
        "trainer.steps=8",
        "trainer.save_every=1",
        "trainer.max_bad_steps=2",
        "algorithm.bad_from=2",
    )
    with pytest.raises(TrainingStopped, match=r"step 3: 2 steps in a row .*step_0000002"):
        build_controller(config).run()
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_0000001", "step_0000002"]  # nothing after the bad steps
    assert verify(out / "checkpoints" / "step_0000002") is None
    assert not (out / "final").exists()
    assert list(losses(out)) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "weight_decay, stop",
    [("0.0", "2 steps in a row"), ("1e10", "step 0: .*weights are not finite")],
)
def test_an_overflowing_lr_stops_the_run_without_a_final_model(tmp_path, weight_decay, stop):
    """lr=1e30 moves every weight by ~1e30 (Adam's step is ~lr): the next losses are NaN and
    max_bad_steps stops the run. With weight decay 1e10 the first update itself makes the
    weights inf behind a finite gradient, caught right after that step."""
    out = tmp_path / "run"
    config = local(
        out,
        "trainer.steps=6",
        "learner.lr=1e30",
        f"learner.weight_decay={weight_decay}",
        "trainer.max_bad_steps=2",
    )
    with pytest.raises(TrainingStopped, match=stop):
        build_controller(config).run()
    assert not (out / "final").exists()
    assert not list(out.glob(".tmp-*"))


def test_the_change_list_ignores_run_length_logging_and_explicit_defaults():
    saved = saved_config(load_config(None, ["algorithm.name=gkd"]))
    same = load_config(
        None,
        [
            "algorithm.beta=0.5",  # gkd's default, now explicit
            "trainer.steps=7",
            "trainer.resume=auto",
            "trainer.eval_every=3",
            "logging.project=x",
            "output_dir=elsewhere",
        ],
    )
    assert config_changes(saved, saved_config(same)) == []
    assert config_hash(same) == config_hash(load_config(None))
    changed = load_config(
        None, ["algorithm.beta=0.1", "learner.lr=0.01", "teachers.0.dtype=bfloat16"]
    )
    assert config_changes(saved, saved_config(changed)) == [
        ("algorithm.beta", 0.5, 0.1),
        ("learner.lr", 0.001, 0.01),
        ("teachers.0.dtype", "float32", "bfloat16"),
    ]
    two = load_config(
        None, ["teachers=[{model: builtin:tiny/teacher}, {model: builtin:tiny/teacher, name: b}]"]
    )
    added = [key for key, *_ in config_changes(saved, saved_config(two))]
    assert added and all(key.startswith("teachers.1.") for key in added)  # a new entry: changed


def test_a_stop_signal_checkpoints_after_the_step_and_the_resume_matches_an_unstopped_run(
    tmp_path,
):
    """SIGTERM's handler calls `request_stop`: the step in flight ends, a checkpoint is
    written off the save schedule (with the rollout run ahead and the prompts drawn ahead),
    and resuming it reproduces the uninterrupted run's losses."""
    common = ["algorithm.name=gkd", "trainer.steps=4", "trainer.max_staleness=1"]
    build_controller(local(tmp_path / "full", *common)).run()
    out = tmp_path / "stopped"
    controller = build_controller(local(out, *common))
    with pytest.raises(Interrupted, match=r"SIGTERM: stopped after step 1 \(2/4 done\)") as stop:
        controller.run(on_step=lambda k, row: k == 1 and controller.request_stop("SIGTERM"))
    assert str(stop.value).endswith("trainer.resume=auto")
    assert "step_0000002" in str(stop.value) and not (out / "final").exists()
    build_controller(local(out, *common, "trainer.resume=true")).run()
    assert losses(out) == losses(tmp_path / "full")
