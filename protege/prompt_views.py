"""Privileged-context teacher keys, checked when the config loads: `teachers.N.prompt_field`
or `teachers.N.prompt_template` (plain `{field}`s of the row only: nothing a user hands in
evaluates anything) and `teachers.N.live`. Imports nothing of protege (config imports it);
protege.privileged does the rest.
"""

from __future__ import annotations

import string
from typing import Any


def template_fields(template: str) -> list[str]:
    """The row fields `template` reads, or a ValueError naming what is not allowed. Only
    plain `{name}` fields: no attribute or index access (`{a.b}`, `{a[0]}`), conversions
    (`{a!r}`), format specs (`{a:>9999}`) or positional `{}` — nothing in a template
    evaluates anything but a row's own text."""
    fields = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:  # an unmatched brace
        raise ValueError(f"{error}; write a literal brace as {{{{ or }}}}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(
                f"field {{{name}}} is not a plain row field name: only {{field}} is allowed "
                "(no positional {}, attribute {a.b} or index {a[0]} access)"
            )
        if conversion or spec:
            extra = f"!{conversion}" if conversion else f":{spec}"
            raise ValueError(f"field {{{name}{extra}}}: conversions and format specs are refused")
        fields.append(name)
    if not fields:
        raise ValueError("names no row field; e.g. '{answer};{prompt}'")
    return fields


def spec_problem(spec: Any) -> str | None:
    """Why a teacher's privileged-context keys cannot work together, or None."""
    if spec.prompt_field is not None and spec.prompt_template is not None:
        return (
            "set prompt_field or prompt_template, not both (a template can read the field: "
            f"prompt_template='{{{spec.prompt_field}}}')"
        )
    if spec.prompt_field is not None and not spec.prompt_field:
        return "prompt_field: must name a row field, e.g. teacher_prompt"
    if spec.prompt_template is not None:
        try:
            template_fields(spec.prompt_template)
        except ValueError as error:
            return f"prompt_template {spec.prompt_template!r}: {error}"
    if spec.live and not spec.is_self:
        return "live: true is the student's current weights: set model: self"
    if spec.live and spec.backend != "hf":
        return "live: true is scored by the learner's own forward: set backend: hf"
    if is_privileged(spec) and spec.backend == "server":
        return (
            "a server teacher scores the student's own prompt only (its start-up checks do "
            "not cover a prompt of its own): use backend hf or vllm for a privileged teacher"
        )
    if spec.live and not is_privileged(spec):
        return (
            "live: true without prompt_field or prompt_template is the student itself, whose "
            "every divergence is zero: give the live teacher a privileged prompt"
        )
    return None


def is_privileged(spec: Any) -> bool:
    """Whether the teacher scores on a prompt of its own."""
    return spec.prompt_field is not None or spec.prompt_template is not None
