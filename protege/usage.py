"""`--help`: the usage line and every config key with its type, default and a one-line doc,
generated from the typed config tree and the preset's algorithm dataclass.

A key's doc is its pydantic `description`, else the comment on its line (or the comment
block just above it) in the source: the comments next to the defaults are the docs.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

HELP_FLAGS = frozenset({"-h", "--help"})


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()  # the value shown for a key with no default
DOC_COLUMN = 64


class _Items:
    def __init__(self, count: int):
        self.count = count

    def __repr__(self) -> str:
        return f"{self.count} item{'s' * (self.count != 1)}, keys below"


def usage(preset: str) -> str:
    """The help text of `python examples/<preset>.py`."""
    from protege.algorithms.registry import ALGORITHMS
    from protege.config import Config, load_config

    config = load_config(preset)
    name = Path(str(preset)).stem
    algorithm = ALGORITHMS[config.algorithm["name"]]
    rows = list(section_rows(Config, config, ""))
    rows = [row for row in rows if not row[0].startswith("algorithm")]
    algorithm_rows = list(algorithm_rows_of(algorithm, config.algorithm))
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
            f"algorithm keys ({config.algorithm['name']}: {first_line(algorithm.__doc__)}):",
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


@cache
def field_comments(cls: type) -> dict[str, str]:
    """{field name: the comment on its definition's lines, or the comment block above it}."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    source = inspect.cleandoc("\n" + source) if source.startswith(" ") else source
    comments: dict[int, str] = {}  # line number -> comment text
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    docs = {}
    body = ast.parse(source).body[0]
    for node in getattr(body, "body", []):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above = []
        line = node.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        docs[node.target.id] = " ".join(own or above)
    return docs


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
