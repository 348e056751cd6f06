"""`--help`: the usage line and every config key with its type, default and a one-line doc,
generated from the typed config tree and the preset's algorithm dataclass.

A key's doc is its pydantic `description`, else the comment on its line (or the comment
block just above it) in the source: the comments next to the defaults are the docs.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from protege.source_docs import REQUIRED, builtin_algorithms, comments_by_class

HELP_FLAGS = frozenset({"-h", "--help"})


DOC_COLUMN = 64


class _Items:
    def __init__(self, count: int):
        self.count = count

    def __repr__(self) -> str:
        return f"{self.count} item{'s' * (self.count != 1)}, keys below"


def usage(preset: str) -> str:
    """The help text of `python examples/<preset>.py`. Imports neither torch nor the
    algorithms (a built-in algorithm's keys are read from its source), so it is instant."""
    from protege.config import Config, config_from_dict, read_tree

    config = config_from_dict(read_tree(preset, []), check_algorithm=False)
    name = Path(str(preset)).stem
    rows = list(section_rows(Config, config, ""))
    rows = [row for row in rows if not row[0].startswith("algorithm")]
    algorithm_doc, algorithm_rows = algorithm_help(config.algorithm)
    intro = (
        f"Trains with preset configs/{name}.yaml; each a.b=value override sets one key (values "
        "are YAML: 1e-4, true, null, [a, b]; list items as teachers.0.model=...).\n"
        "A bad input prints one `error: ...` block and exits with code 2 (PROTEGE_DEBUG=1 shows "
        "the traceback)."
    )
    return "\n".join(
        [
            f"usage: python examples/{name}.py [a.b=value ...]",
            "",
            intro,
            "",
            "keys (type) = this preset's value:",
            *format_rows(rows),
            "",
            f"algorithm keys ({config.algorithm['name']}: {algorithm_doc}):",
            *format_rows(algorithm_rows),
        ]
    )


def format_rows(rows: list[tuple[str, str, Any, str]]) -> list[str]:
    """One line per key: `key (type) = value`, its doc in a column (or after it when long)."""
    lines = []
    for key, kind, value, doc in rows:
        head = f"  {key} ({kind}) = {value!r}"
        lines.append(f"{head:<{DOC_COLUMN}}  {doc}".rstrip())
    return lines


def section_rows(model: type[BaseModel], value: Any, prefix: str):
    """(dotted key, type name, value, doc) of every leaf key under `model`; list-of-section
    fields list their item's keys as `key.N.field` (with the first item's values)."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        current = getattr(value, name, REQUIRED)
        section = _section(info.annotation)
        doc = info.description or field_comments(model).get(name, "")
        if section is not None and not _is_list(info.annotation):
            yield from section_rows(section, current, f"{key}.")
        elif section is not None:
            yield key, type_name(info.annotation), _Items(len(current)), doc
            item = current[0] if current else section.model_construct()
            yield from section_rows(section, item, f"{key}.N.")
        else:
            yield key, type_name(info.annotation), current, doc


def algorithm_help(params: dict[str, Any]) -> tuple[str, list[tuple[str, str, Any, str]]]:
    """(first docstring line, key rows) of the algorithm `params` names: a built-in one from
    its source; any other (registered by user code) from its imported dataclass."""
    name = params["name"]
    source = builtin_algorithms().get(name) if isinstance(name, str) else None
    if source is None:
        from protege.algorithms.registry import ALGORITHMS
        from protege.errors import AlgorithmConfigError

        if not isinstance(name, str) or name not in ALGORITHMS:
            known = ", ".join(sorted(ALGORITHMS))
            raise AlgorithmConfigError("name", f"unknown algorithm {name!r}; registered: {known}")
        cls = ALGORITHMS[name]
        return first_line(cls.__doc__), list(algorithm_rows_of(cls, params))
    rows = [("algorithm.name", "str", name, "the registered algorithm")]
    for field, kind, default, doc in source.fields:
        rows.append((f"algorithm.{field}", kind, params.get(field, default), doc))
    return source.doc, rows


def algorithm_rows_of(cls: type, params: dict[str, Any]):
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    yield "algorithm.name", "str", params["name"], "the registered algorithm"
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        default = params.get(field.name, field.default)
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()  # type: ignore[misc]
        doc = comments.get(field.name, "")
        yield f"algorithm.{field.name}", type_name(hints[field.name]), default, doc


def field_comments(cls: type) -> dict[str, str]:
    """{field name: the comment on its definition's line, or the comment block above it}."""
    try:
        path = Path(inspect.getsourcefile(cls) or "")
    except TypeError:  # a class without a source file
        return {}
    return comments_by_class(path).get(cls.__qualname__, {}) if path.is_file() else {}


def type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "|".join(str(arg) for arg in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in typing.get_args(hint))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(hint))}]"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0].rstrip(".")


def _section(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list
