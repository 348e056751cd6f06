"""What the driver checks on disk before any worker loads a model: every model path is a
local model directory (nothing is downloaded at run time) and `output_dir` can be written;
once the prompts are read, that prompt plus response fit in each model's positions.
Each refusal is a SetupError naming the key and the fix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from protege.capabilities import reward_labels_problem
from protege.errors import SetupError
from protege.modeling import check_model_dir, load_model_config

if TYPE_CHECKING:
    from protege.config import Config


def model_keys(config: Config) -> list[tuple[str, str]]:
    """(config key, model path) of every model the run loads: the student, each teacher
    that is not the student itself or on a server, each reward model."""
    keys = [("student.model", config.student.model)]
    keys += [
        (f"teachers.{i}.model", teacher.model)
        for i, teacher in enumerate(config.teachers)
        if not teacher.is_self and not teacher.on_server
    ]
    keys += [(f"reward.models.{i}.path", spec.path) for i, spec in enumerate(config.reward.models)]
    return keys


def check_paths(config: Config) -> None:
    for key, name in model_keys(config):
        check_model_dir(name, key)
    for i, spec in enumerate(config.reward.models):  # reads config.json only
        model_config = load_model_config(spec.path)
        key = f"reward.models.{i}"
        kinds = model_config.architectures or []
        if kinds and not any(kind.endswith("ForSequenceClassification") for kind in kinds):
            raise SetupError(
                f"{key}.path: {spec.path!r} is a {', '.join(kinds)}, not a sequence-"
                "classification reward model (its score head would be untrained)"
            )
        reason = reward_labels_problem(key, spec.path, model_config.num_labels)
        if reason:
            raise SetupError(reason)
    check_output_dir(config.output_dir)


def check_positions(config: Config, longest_prompt: int) -> None:
    """The longest prompt plus a full response fits in every model's positions (a longer
    sequence would index past the position table, or silently degrade with rotary models)."""
    longest = longest_prompt + config.rollout.max_new_tokens
    for key, name in model_keys(config):
        if key.startswith("reward."):
            continue
        limit = max_positions(load_model_config(name))
        if limit is not None and longest > limit:
            raise SetupError(
                f"{key}: {name} has {limit} positions, but the longest prompt "
                f"({longest_prompt} tokens) plus rollout.max_new_tokens="
                f"{config.rollout.max_new_tokens} is {longest}; lower rollout.max_new_tokens "
                "or data.max_prompt_tokens (with data.overlong=truncate_left or drop)"
            )


def max_positions(model_config) -> int | None:
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model_config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_output_dir(name: str) -> None:
    """`output_dir` is a writable directory, or can be made one (it is not created here)."""
    path = Path(name).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise SetupError(
            f"output_dir: {path} is a file, not a directory; choose another output_dir"
        )
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SetupError(
            f"output_dir: {path} cannot be created: {existing} is a file; choose another output_dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        what = (
            "is not writable"
            if existing == path
            else f"cannot be created ({existing} is not writable)"
        )
        raise SetupError(f"output_dir: {path} {what}; choose a directory you can write to")
