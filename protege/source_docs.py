"""Key docs read from the source: the comment next to a field is its doc, and the built-in
algorithms' hyper-parameters are read from their files with `ast`, so `--help` lists them
without importing the algorithms (and with them torch, ~20 s on a cold start).
"""

from __future__ import annotations

import ast
import io
import operator
import textwrap
import tokenize
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

ALGORITHM_DIR = Path(__file__).resolve().parent / "algorithms"
_ARITHMETIC = {ast.Div: operator.truediv, ast.Mult: operator.mul, ast.Add: operator.add,
               ast.Sub: operator.sub, ast.Pow: operator.pow}  # fmt: skip


class Missing:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED = Missing()  # the value shown for a key with no default


@dataclass(frozen=True)
class AlgorithmSource:
    """A registered algorithm as its source declares it."""

    doc: str  # the first line of its docstring
    fields: tuple[tuple[str, str, Any, str], ...]  # (name, type name, default, doc)


@cache
def parsed(path: Path) -> tuple[ast.Module, list[str]]:
    """(syntax tree, lines) of a source file, read once."""
    text = path.read_text(encoding="utf-8")
    return ast.parse(text), text.splitlines()


@cache
def comments_by_class(path: Path) -> dict[str, dict[str, str]]:
    """{class name: {field name: the comment on its definition's lines, or the comment
    block just above it}} for the top-level classes of a source file."""
    module, lines = parsed(path)
    return {
        node.name: _field_comments(node, lines)
        for node in module.body
        if isinstance(node, ast.ClassDef)
    }


def _field_comments(node: ast.ClassDef, lines: list[str]) -> dict[str, str]:
    docs = {}
    for item in node.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        own = _comments(lines[item.lineno - 1 : item.end_lineno])
        above = []
        line = item.lineno - 1
        while line >= 1 and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, lines[line - 1].lstrip().lstrip("#").strip())
            line -= 1
        docs[item.target.id] = " ".join(own or above)
    return docs


def _comments(statement: list[str]) -> list[str]:
    """The comments in one statement's lines (tokenised: a `#` inside a string is no
    comment). Only the fields' own lines are tokenised, which keeps `--help` instant."""
    source = textwrap.dedent("\n".join(statement)) + "\n"
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return []
    return [t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT]


@cache
def builtin_algorithms() -> dict[str, AlgorithmSource]:
    """{registered name: its source declaration} of every `@register(...)` class in
    protege/algorithms/."""
    found = {}
    for path in sorted(ALGORITHM_DIR.glob("*.py")):
        module, _ = parsed(path)
        aliases = _aliases(module)
        for node in module.body:
            name = _registered_name(node)
            if name is None:
                continue
            found[name] = AlgorithmSource(
                doc=(ast.get_docstring(node) or "").split("\n")[0].rstrip("."),
                fields=tuple(_fields(node, aliases, comments_by_class(path)[node.name])),
            )
    return found


def _aliases(module: ast.Module, follow: bool = True) -> dict[str, ast.expr]:
    """{name: value} of the module's `Name = ...` assignments (type aliases), and of those
    it imports from other protege modules (`from protege.records import Source`)."""
    found: dict[str, ast.expr] = {}
    for node in module.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = node.value
        elif (
            follow
            and isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("protege.")
        ):
            path = ALGORITHM_DIR.parent.joinpath(*node.module.split(".")[1:]).with_suffix(".py")
            if path.is_file():
                theirs = _aliases(parsed(path)[0], follow=False)
                found.update({a.name: theirs[a.name] for a in node.names if a.name in theirs})
    return found


def _registered_name(node: ast.stmt) -> str | None:
    if not isinstance(node, ast.ClassDef):
        return None
    for decorator in node.decorator_list:
        if (
            isinstance(decorator, ast.Call)
            and getattr(decorator.func, "id", None) == "register"
            and decorator.args
            and isinstance(decorator.args[0], ast.Constant)
        ):
            return decorator.args[0].value
    return None


def _fields(node: ast.ClassDef, aliases: dict[str, ast.expr], docs: dict[str, str]):
    """(name, type name, default, doc) of each constructor field, in order (ClassVars and
    `field(init=False)` are not keys)."""
    for item in node.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        if ast.unparse(item.annotation).startswith("ClassVar"):
            continue
        default: Any = REQUIRED
        value = item.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
            keywords = {k.arg: k.value for k in value.keywords}
            if "init" in keywords and _constant(keywords["init"]) is False:
                continue
            value = keywords.get("default")
        if value is not None:
            default = _constant(value)
        name = item.target.id
        yield name, _type_name(item.annotation, aliases), default, docs.get(name, "")


def _constant(node: ast.expr) -> Any:
    """A default written as a literal or constant arithmetic (`1 / 3`); else its source."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = _constant(node.left), _constant(node.right)
        if all(isinstance(v, (int, float)) for v in (left, right)):
            return _ARITHMETIC[type(node.op)](left, right)
    return ast.unparse(node)


def _type_name(node: ast.expr, aliases: dict[str, ast.expr]) -> str:
    """The name `protege.usage.type_name` gives the same annotation once imported."""
    if isinstance(node, ast.Name) and node.id in aliases:
        return _type_name(aliases[node.id], aliases)
    if isinstance(node, ast.Constant) and node.value is None:
        return "null"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return f"{_type_name(node.left, aliases)} | {_type_name(node.right, aliases)}"
    if isinstance(node, ast.Subscript):
        base = ast.unparse(node.value).split(".")[-1]
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if base == "Literal":
            return "|".join(str(ast.literal_eval(item)) for item in items)
        return f"{base}[{', '.join(_type_name(item, aliases) for item in items)}]"
    return ast.unparse(node)
