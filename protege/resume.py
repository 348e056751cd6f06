"""Which run an output_dir holds, decided before anything writes to it.

`trainer.resume`: false starts fresh (refused in a used output_dir unless
`trainer.overwrite`), true resumes from the newest complete checkpoint (refused when there
is none), auto resumes when there is one and starts fresh otherwise. A resume is refused
for another student model or algorithm, and for changed hyper-parameters unless
`trainer.resume_allow_changes`; metrics.jsonl is cut back to the rows before the resumed
step so no step appears twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protege.checkpoint import CheckpointError, Manifest, latest_checkpoint
from protege.config import Config

METRICS_FILE = "metrics.jsonl"
# Keys a resumed run may change freely: run length, run management, evaluation, logging.
FREE_KEYS = (
    "output_dir",
    "logging.",
    "trainer.steps",
    "trainer.resume",
    "trainer.resume_allow_changes",
    "trainer.overwrite",
    "trainer.keep_last",
    "trainer.max_bad_steps",
    "trainer.save_every",
    "trainer.workers",
    "trainer.ray_address",
    "trainer.worker_restarts",
    "trainer.placement_timeout_s",
    "rollout.colocate_teacher",  # where the teacher runs, not what it computes
    "trainer.eval_",
    "data.test",
)


def warn(message: str) -> None:
    print(f"[protege] {message}", file=sys.stderr, flush=True)


def prepare_output_dir(config: Config, warn: Callable[[str], None] = warn) -> Path | None:
    """The checkpoint to resume from (its manifest verified), or None for a fresh run; a
    fresh run finds an empty output_dir (or empties it with `trainer.overwrite`)."""
    out = Path(config.output_dir)
    root = out / "checkpoints"
    mode = config.trainer.resume
    checkpoint = latest_checkpoint(root, warn) if mode else None
    if checkpoint is not None:
        manifest = Manifest.read(checkpoint)
        check_compatible(manifest, config, checkpoint, warn)
        truncate_metrics(out / METRICS_FILE, manifest.step)
        return checkpoint
    if mode is True:
        raise CheckpointError(
            f"trainer.resume=true but {root} holds no complete checkpoint; set "
            "trainer.resume=auto to start fresh when there is none"
        )
    used = [p.name for p in (out / METRICS_FILE, root) if p.exists()]
    if used and mode == "auto":
        warn(f"trainer.resume=auto: no complete checkpoint in {root}; starting fresh")
        (out / METRICS_FILE).unlink(missing_ok=True)
    elif used and not config.trainer.overwrite:
        raise CheckpointError(
            f"output_dir {out} already holds a run ({', '.join(used)}); set "
            "trainer.overwrite=true to replace it, or trainer.resume=auto to continue it"
        )
    elif used:
        warn(f"trainer.overwrite=true: deleting the old run's {', '.join(used)} and final/")
        (out / METRICS_FILE).unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(out / "final", ignore_errors=True)
    return None


def check_compatible(
    manifest: Manifest, config: Config, checkpoint: Path, warn: Callable[[str], None]
) -> None:
    """Refuse another student or algorithm; list changed hyper-parameters, which need
    `trainer.resume_allow_changes=true`."""
    algorithm = config.algorithm["name"]
    for what, saved, now in (
        ("student.model", manifest.student_model, config.student.model),
        ("algorithm.name", manifest.algorithm, algorithm),
    ):
        if saved != now:
            raise CheckpointError(
                f"{checkpoint} was trained with {what}={saved!r}, this run has {now!r}; "
                "resume with the same one, or start a fresh output_dir"
            )
    if manifest.config_hash == config_hash(config):
        return
    now = saved_config(config)
    added = keys_added(manifest.config, now)
    if added:  # an older protege wrote the checkpoint: nothing to compare them with
        listed = "; ".join(f"{key}={value!r}" for key, value in added)
        warn(f"{checkpoint} predates these settings, which take this run's values: {listed}")
    changes = config_changes(manifest.config, now)
    if not changes:
        return
    listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)
    if not config.trainer.resume_allow_changes:
        raise CheckpointError(
            f"resuming from {checkpoint} with changed hyper-parameters: {listed}; set "
            "trainer.resume_allow_changes=true to resume anyway, or restore them"
        )
    warn(f"resuming with changed hyper-parameters: {listed}")


def saved_config(config: Config) -> dict[str, Any]:
    """The config as a checkpoint records it: JSON, with every algorithm hyper-parameter
    (defaults included, so `algorithm.beta=0.5` equals an unset default of 0.5)."""
    tree = config.model_dump(mode="json")
    algorithm = config.build_algorithm()
    params = {f.name: getattr(algorithm, f.name) for f in dataclasses.fields(algorithm) if f.init}
    tree["algorithm"] = json.loads(json.dumps({"name": algorithm.name, **params}, default=str))
    return tree


def config_hash(config: Config) -> str:
    """sha256 of the config without the keys a resume may change (FREE_KEYS)."""
    kept = {k: v for k, v in flatten(saved_config(config)).items() if not _free(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, new value) for every key outside FREE_KEYS that differs,
    except keys the checkpoint predates (`keys_added`)."""
    old, new = flatten(saved), flatten(now)
    newer = {key for key, _ in keys_added(saved, now)}
    keys = sorted(k for k in old.keys() | new.keys() if not _free(k) and k not in newer)
    missing = "<unset>"
    return [
        (k, old.get(k, missing), new.get(k, missing))
        for k in keys
        if old.get(k, missing) != new.get(k, missing)
    ]


def keys_added(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any]]:
    """(dotted key, new value) for the settings outside FREE_KEYS that this config has and
    the checkpoint lacks because an older protege wrote it: a field its section did not
    have yet. A new entry of a list section (another teacher) is a change, not this."""
    old, new = flatten(saved), flatten(now)
    return [(k, new[k]) for k in sorted(new.keys() - old.keys()) if not _free(k) and _newer(k, old)]


def _newer(key: str, old: dict[str, Any]) -> bool:
    parts = key.split(".")
    for cut in range(len(parts) - 1, -1, -1):  # the deepest section the checkpoint has
        section = ".".join(parts[:cut])
        if not section or any(k.startswith(section + ".") for k in old):
            return not parts[cut].isdigit()  # below it: a field, or a new list entry
    return True


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        items = enumerate(tree)  # list of sections (teachers, reward rules): index them
    else:
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def _free(key: str) -> bool:
    return any(
        key == free or (free.endswith((".", "_")) and key.startswith(free)) for free in FREE_KEYS
    )


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows a resume from `step` does not write again: training and evaluation rows
    of steps before it, and the first run's eval_before rows (once); drop its eval_after
    rows and a line cut short by a kill."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if _kept(row, step):
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _kept(row: dict[str, Any], step: int) -> bool:
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        return False
    if row["step"] >= 0:
        return row["step"] < step
    return any(key.startswith(("eval_before/", "time/eval_before")) for key in row)
