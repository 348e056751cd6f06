"""Checkpoint folders on disk: atomic writes, manifests that refuse tampered files, fallback
past broken checkpoints, rotation, a full disk named as such, and the rollouts in flight
saved without pickle."""

from __future__ import annotations

import errno
import json
from collections import namedtuple

import pytest
import torch

from protege import checkpoint
from protege.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    step_folder,
    verify,
    write_checkpoint,
)
from protege.records import PromptBatch, RolloutBatch
from protege.rollout_files import FIELDS_FILE, TENSORS_FILE, load_rollouts, save_rollouts
from protege.rollouts import Submitted

META = {"config_hash": "h", "algorithm": "gkd", "student_model": "m", "config": {}}


def writer(payload: bytes = b"weights"):
    def write(folder):
        (folder / "learner").mkdir()
        (folder / "learner" / "model.pt").write_bytes(payload)
        (folder / "controller.json").write_text("{}")

    return write


def test_checkpoint_is_renamed_into_place_with_its_manifest_last(tmp_path):
    path = write_checkpoint(tmp_path, 2, writer(), META)
    assert path == step_folder(tmp_path, 2) and path.name == "step_0000002"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["algorithm"] == "gkd"
    assert set(manifest["files"]) == {"learner/model.pt", "controller.json"}
    assert manifest["files"]["learner/model.pt"]["size"] == len(b"weights")
    assert verify(path) is None
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000002"]  # no temporary left


def test_a_write_killed_midway_leaves_no_step_folder(tmp_path):
    write_checkpoint(tmp_path, 1, writer(), META)

    def dies(folder):
        (folder / "half.pt").write_bytes(b"x")
        raise KeyboardInterrupt  # a kill between two files

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 2, dies, META)
    # what a SIGKILL leaves behind: a temporary folder, never a step_K without a manifest
    (tmp_path / ".tmp-step_0000003").mkdir()
    assert latest_checkpoint(tmp_path) == step_folder(tmp_path, 1)
    write_checkpoint(tmp_path, 4, writer(), META)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001", "step_0000004"]


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda p: (p / "learner" / "model.pt").write_bytes(b"evil!!!"), "sha256"),
        (lambda p: (p / "learner" / "model.pt").write_bytes(b"short"), "bytes"),
        (lambda p: (p / "learner" / "model.pt").unlink(), "missing"),
        (lambda p: (p / "manifest.json").write_text('{"step": 2'), "unreadable manifest"),
        (lambda p: (p / "manifest.json").unlink(), "no manifest"),
    ],
    ids=["tampered", "truncated", "missing", "bad-manifest", "no-manifest"],
)
def test_resume_falls_back_past_a_broken_checkpoint_naming_what_is_wrong(tmp_path, damage, problem):
    write_checkpoint(tmp_path, 1, writer(), META)
    newest = write_checkpoint(tmp_path, 2, writer(), META)
    damage(newest)
    warnings = []
    assert latest_checkpoint(tmp_path, warnings.append) == step_folder(tmp_path, 1)
    assert len(warnings) == 1 and "step_0000002" in warnings[0] and problem in warnings[0]


def test_keep_last_deletes_older_complete_checkpoints(tmp_path):
    for step in range(1, 5):
        write_checkpoint(tmp_path, step, writer(), META, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000003", "step_0000004"]
    write_checkpoint(tmp_path, 5, writer(), META, keep_last=0)  # 0 keeps all
    assert len(list(tmp_path.iterdir())) == 3


def test_a_full_disk_is_reported_with_the_path_and_the_fix(tmp_path):
    def full(folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.pt"))

    with pytest.raises(
        CheckpointError,
        match=r"No space left on device while writing .*model\.pt"
        r": free space or lower trainer.keep_last",
    ):
        write_checkpoint(tmp_path, 1, full, META)
    assert not list(tmp_path.iterdir())  # the partial folder is removed


def test_torch_save_failing_on_a_full_disk_is_reported_as_one(tmp_path, monkeypatch):
    """torch.save says only 'file write failed' (a RuntimeError without errno)."""

    def fails(folder):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(100, 100, 0))
    with pytest.raises(CheckpointError, match="No space left on device"):
        write_checkpoint(tmp_path, 1, fails, META)


def _rollouts() -> dict[int, Submitted]:
    g = torch.Generator().manual_seed(0)
    prompts = PromptBatch(
        prompt_ids=torch.randint(0, 9, (2, 3), generator=g),
        prompt_mask=torch.ones(2, 3, dtype=torch.bool),
        answers=("4", None),
        step=5,
    )
    shard = RolloutBatch(
        prompt_ids=prompts.prompt_ids,
        prompt_mask=prompts.prompt_mask,
        response_ids=torch.randint(0, 9, (2, 4), generator=g),
        response_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool),
        token_source=torch.zeros(2, 4, dtype=torch.int8),
        teacher_logprobs=torch.randn(2, 4, generator=g).to(torch.bfloat16),
        rewards=torch.randn(2, generator=g),
        answers=("4", None),
        token_count=6.0,
        step=5,
        weights_version=3,
        extras={"rollout/seconds": 0.5},
    )
    empty = shard.select(slice(0, 0))
    return {5: Submitted(prompts, [shard, empty])}


def test_rollouts_in_flight_round_trip_without_pickle(tmp_path, monkeypatch):
    save_rollouts(tmp_path, _rollouts())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([FIELDS_FILE, TENSORS_FILE])
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was used"))
    loaded = load_rollouts(tmp_path)
    expected = _rollouts()
    assert loaded.keys() == expected.keys()
    got, want = loaded[5], expected[5]
    assert got.prompts.answers == want.prompts.answers and got.prompts.step == 5
    assert torch.equal(got.prompts.prompt_ids, want.prompts.prompt_ids)
    assert got.prompts.completion_ids is None
    for a, b in zip(got.shards, want.shards):
        for name, value in vars(b).items():
            if isinstance(value, torch.Tensor):
                assert getattr(a, name).dtype == value.dtype and torch.equal(
                    getattr(a, name), value
                )
            else:
                assert getattr(a, name) == value, name


def test_rollout_fields_outside_the_records_are_refused(tmp_path):
    save_rollouts(tmp_path, _rollouts())
    fields = json.loads((tmp_path / FIELDS_FILE).read_text())
    fields["5"]["shards"][0]["__reduce__"] = {"value": "os.system"}
    (tmp_path / FIELDS_FILE).write_text(json.dumps(fields))
    with pytest.raises(ValueError, match="unknown RolloutBatch fields"):
        load_rollouts(tmp_path)
