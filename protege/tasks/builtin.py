"""The built-in tiny task as one bundle of defaults, and the rule for when it applies.

The bundle (student, teacher, train/test data, pre-training text; answers are checked by
exact match) is the config's defaults. Its data is used only while the run names no model
or data of its own (every model or data path it names is `builtin:...`, or the `self`
teacher). A run that names its own student, teacher or data must name `data.train`, and
evaluation and MiniLLM's pre-training text stay off unless it names them (`data.test`,
`data.pretrain`; a `builtin:tiny/...` path is asking for them). An unnamed model stays the
tiny one, which the tokenizer check refuses next to a model of another family.

Pure Python on the raw config mapping (before validation), so config.py stays import-light.
"""

from __future__ import annotations

from typing import Any

BUILTIN = "builtin:"
SELF = "self"  # config.SELF_TEACHER (config imports this module, not the reverse)
REQUIRED = ("data.train",)  # a run with its own models or data must name these
OFF_UNLESS_NAMED = ("data.test", "data.pretrain")


class OwnTaskError(ValueError):
    """A run with its own models or data leaves a required key to the built-in task."""


def named_values(tree: dict[str, Any]) -> dict[str, Any]:
    """The bundle keys the raw mapping names, dotted (`teachers.N.model` per teacher)."""
    named = {}
    for dotted in ("student.model", "data.train", "data.test", "data.pretrain"):
        section, key = dotted.split(".")
        node = tree.get(section)
        if isinstance(node, dict) and key in node:
            named[dotted] = node[key]
    for index, teacher in enumerate(teacher_items(tree)):
        if isinstance(teacher, dict) and "model" in teacher:
            named[f"teachers.{index}.model"] = teacher["model"]
    return named


def teacher_items(tree: dict[str, Any]) -> list:
    if isinstance(tree.get("teachers"), list):
        return tree["teachers"]
    return [tree["teacher"]] if "teacher" in tree else [{}]


def is_builtin(value: Any) -> bool:
    """A value that does not leave the built-in task: a builtin path, the self-teacher,
    null (no test set / no pre-training text), or something the validator will refuse."""
    return not isinstance(value, str) or value.startswith(BUILTIN) or value == SELF


def uses_builtin_task(tree: dict[str, Any]) -> bool:
    return all(map(is_builtin, named_values(tree).values()))


def apply_task_defaults(tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` as the run means it: unchanged on the built-in task (the field defaults are
    the bundle); for a run of the user's own, a missing `data.train` refused and
    `data.test` / `data.pretrain` set to null unless named."""
    if not isinstance(tree, dict) or uses_builtin_task(tree):
        return tree
    named = named_values(tree)
    missing = [key for key in REQUIRED if key not in named]
    if missing:
        own = ", ".join(f"{k}={v}" for k, v in named.items() if not is_builtin(v))
        raise OwnTaskError(
            f"{', '.join(missing)}: not set. This run names its own models or data ({own}), "
            "so nothing is taken from the built-in tiny task: set "
            + " and ".join(f"{key}=..." for key in missing)
            + " (or a builtin:tiny/... path to use the built-in one on purpose)"
        )
    data = dict(tree.get("data") or {})
    for dotted in OFF_UNLESS_NAMED:
        data.setdefault(dotted.split(".")[1], None)
    return {**tree, "data": data}
