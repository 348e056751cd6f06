"""The rollouts in flight at a checkpoint, on disk without pickle: every tensor in one
safetensors file, every other field (answers, step, versions, extras) in one JSON file.
Loading them runs no code from the checkpoint folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from protege.records import PromptBatch, RolloutBatch
from protege.rollouts import Submitted
from protege.teacher_payload import flatten_named, unflatten_named
from protege.teacher_prompts import TeacherPrompts, from_flat

TENSORS_FILE = "pending_rollouts.safetensors"
FIELDS_FILE = "pending_rollouts.json"


def save_rollouts(folder: Path, pending: dict[int, Submitted]) -> None:
    tensors: dict[str, Tensor] = {}
    steps = {}
    for step, submitted in pending.items():
        steps[str(step)] = {
            "prompts": _split(submitted.prompts, f"{step}/prompts", tensors),
            "shards": [
                _split(shard, f"{step}/shard{i}", tensors)
                for i, shard in enumerate(submitted.shards)
            ],
        }
    save_file(tensors, str(folder / TENSORS_FILE))
    (folder / FIELDS_FILE).write_text(json.dumps(steps))


def load_rollouts(folder: Path) -> dict[int, Submitted]:
    """What `save_rollouts` wrote; an empty dict when the folder holds none."""
    if not (folder / FIELDS_FILE).exists():
        return {}
    tensors = load_file(str(folder / TENSORS_FILE))
    steps = json.loads((folder / FIELDS_FILE).read_text())
    return {
        int(step): Submitted(
            _join(PromptBatch, saved["prompts"], tensors),
            [_join(RolloutBatch, shard, tensors) for shard in saved["shards"]],
        )
        for step, saved in steps.items()
    }


def _split(record: Any, prefix: str, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """The record's plain fields, with each tensor field replaced by its safetensors key."""
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if isinstance(value, Tensor):
            key = f"{prefix}/{field.name}"
            tensors[key] = value.detach().cpu().contiguous().clone()
            fields[field.name] = {"tensor": key}
        elif field.name == "named_teachers":  # several teachers' payloads: tensors by name
            names, flat = flatten_named(value)
            for key, tensor in flat.items():
                tensors[f"{prefix}/{key}"] = tensor.detach().cpu().contiguous().clone()
            fields[field.name] = {"named": names, "keys": [f"{prefix}/{key}" for key in flat]}
        elif isinstance(value, tuple):
            fields[field.name] = {"tuple": list(value)}
        elif isinstance(value, TeacherPrompts):
            keys = {}
            for name, tensor in value.flat().items():
                keys[name] = f"{prefix}/{name}"
                tensors[keys[name]] = tensor.detach().cpu().contiguous().clone()
            fields[field.name] = {"teacher_prompts": keys}
        else:
            fields[field.name] = {"value": value}
    return fields


def _join(record_type: type, fields: dict[str, Any], tensors: dict[str, Tensor]) -> Any:
    known = {field.name for field in dataclasses.fields(record_type)}
    unknown = set(fields) - known
    if unknown:
        raise ValueError(f"{FIELDS_FILE}: unknown {record_type.__name__} fields {sorted(unknown)}")
    values = {}
    for name, saved in fields.items():
        if "tensor" in saved:
            values[name] = tensors[saved["tensor"]]
        elif "named" in saved:
            flat = {key.rsplit("/", 1)[1]: tensors[key] for key in saved["keys"]}
            values[name] = unflatten_named(saved["named"], flat)
        elif "tuple" in saved:
            values[name] = tuple(saved["tuple"])
        elif "teacher_prompts" in saved:
            flat = {key: tensors[stored] for key, stored in saved["teacher_prompts"].items()}
            values[name] = from_flat(flat)
        else:
            values[name] = saved["value"]
    return record_type(**values)
