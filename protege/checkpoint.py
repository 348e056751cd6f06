"""Checkpoint folders: written atomically, verified by a manifest, rotated.

`checkpoints/step_K` is written into a hidden sibling folder, every file is fsynced, the
manifest (step, config hash, algorithm, student model, each file's size and sha256) is
written last, and the folder is renamed into place: a kill leaves either the old set of
checkpoints or the new one, never a half-written `step_K`. A resume takes the newest
folder whose manifest verifies, so a tampered or truncated file is refused before anything
in it is loaded (DeepSpeed's learner files are pickles; see `Learner.load_checkpoint`).

The controller's share (step, data position, algorithm state) is JSON; samplers draw from
generators seeded by (seed, step), so nothing else is needed to reproduce the
uninterrupted run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protege.algorithms.registry import Algorithm
from protege.data import PromptSource
from protege.errors import ProtegeError

MANIFEST = "manifest.json"
CONTROLLER_FILE = "controller.json"
TMP_PREFIX = ".tmp-"
DISK_FULL_FREE_BYTES = 64 * 2**20  # after a failed write, less free than this reads as full


class CheckpointError(ProtegeError):
    """A checkpoint that cannot be written or resumed from; the message says why and the fix."""


@dataclass(frozen=True)
class Manifest:
    step: int
    config_hash: str
    algorithm: str
    student_model: str
    config: dict[str, Any]  # the run's config (model_dump), for the resume's change list
    files: dict[str, dict[str, Any]]  # relative path -> {"size", "sha256"}

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        data = json.loads((folder / MANIFEST).read_text())
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


def step_folder(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def write_checkpoint(
    root: Path,
    step: int,
    write: Callable[[Path], None],
    meta: dict[str, Any],
    keep_last: int = 0,
) -> Path:
    """`write(folder)` fills a temporary folder; it is fsynced, its manifest (`meta` plus
    the file list) written last, and renamed to `root/step_K`; then older complete
    checkpoints beyond `keep_last` (0: keep all) are deleted. A full disk raises a
    CheckpointError naming the path and the fix."""
    final = step_folder(root, step)
    remove_partial(root)
    write_atomically(final, write, manifest={"step": step, **meta})
    rotate(root, keep_last)
    return final


def write_atomically(
    final: Path, write: Callable[[Path], None], manifest: dict[str, Any] | None = None
) -> None:
    """`write(folder)` into a temporary sibling, fsynced, with `manifest` plus the file list
    written last when given, then renamed to `final`: a kill never leaves a half-written
    folder (checkpoints, the final model)."""
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        files = {str(p.relative_to(tmp)): _sync_and_hash(p) for p in _files(tmp)}
        if manifest is not None:
            text = json.dumps({**manifest, "files": files}, indent=1, sort_keys=True)
            _write_synced(tmp / MANIFEST, text)
        _replace(tmp, final)
    except Exception as error:
        full = disk_full(error, final.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise CheckpointError(
                f"No space left on device while writing {full}: free space or lower "
                "trainer.keep_last"
            ) from error
        raise


def verify(folder: Path) -> str | None:
    """None when `folder`'s manifest lists exactly what is on disk, else what is wrong."""
    try:
        manifest = Manifest.read(folder)
    except FileNotFoundError:
        return "no manifest.json (an unfinished or pre-manifest checkpoint)"
    except (ValueError, KeyError, TypeError) as error:
        return f"unreadable manifest.json ({type(error).__name__}: {error})"
    if step_folder(folder.parent, manifest.step).name != folder.name:
        return f"manifest.json says step {manifest.step}"
    for name, expected in manifest.files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its sha256 in manifest.json (modified or corrupt)"
    return None


def latest_checkpoint(
    root: Path, warn: Callable[[str], None] = lambda message: None
) -> Path | None:
    """The newest checkpoint whose manifest verifies; each broken newer one is skipped with
    a warning that names what is wrong with it."""
    for folder in sorted(root.glob("step_*"), reverse=True):
        problem = verify(folder)
        if problem is None:
            return folder
        warn(f"skipping checkpoint {folder}: {problem}")
    return None


def rotate(root: Path, keep_last: int) -> None:
    """Delete complete checkpoints (with a manifest) older than the newest `keep_last`."""
    if keep_last <= 0:
        return
    complete = [p for p in sorted(root.glob("step_*")) if (p / MANIFEST).exists()]
    for folder in complete[:-keep_last]:
        shutil.rmtree(folder)


def remove_partial(root: Path) -> None:
    """Temporary folders a killed checkpoint write left behind."""
    for folder in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(folder, ignore_errors=True)


def disk_full(error: BaseException, where: Path) -> str | None:
    """The path being written when `error` came from a full disk, else None. DeepSpeed's
    torch.save reports a full disk as a RuntimeError ("file write failed") without errno,
    so a failed write with (almost) no free space left also counts."""
    for cause in _chain(error):
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return str(cause.filename or where)
        if "No space left on device" in str(cause):
            return str(where)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return None
    return str(where) if free < DISK_FULL_FREE_BYTES else None


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _sync_and_hash(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb+") as handle:
        for chunk in iter(lambda: handle.read(2**22), b""):
            digest.update(chunk)
        os.fsync(handle.fileno())
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(2**22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _replace(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final` (an old `final` is moved aside first, then deleted) and fsync
    the parent so the rename itself survives a crash."""
    old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    if sys.platform != "win32":
        descriptor = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


# -- the controller's share ------------------------------------------------------------------
def save_controller_state(
    path: Path, next_step: int, prompts: PromptSource, algorithm: Algorithm
) -> None:
    """JSON only: the algorithm is rebuilt from the config, and its adaptive state (moving
    baselines, schedules) is restored from its `state_dict()`."""
    state = {
        "next_step": next_step,
        "prompts": prompts.state_dict(),
        "algorithm": {"name": algorithm.name, "state": algorithm.state_dict()},
    }
    (path / CONTROLLER_FILE).write_text(json.dumps(state))


def load_controller_state(path: Path, prompts: PromptSource, algorithm: Algorithm) -> int:
    """Restore the data position and `algorithm`'s state in place; returns the next step."""
    state = json.loads((path / CONTROLLER_FILE).read_text())
    saved = state["algorithm"]
    if saved["name"] != algorithm.name:
        raise CheckpointError(
            f"{path} was written by algorithm {saved['name']!r}, this run is {algorithm.name!r}; "
            "resume with the same algorithm or start a fresh output_dir"
        )
    prompts.load_state_dict(state["prompts"])
    algorithm.load_state_dict(saved["state"])
    return state["next_step"]
