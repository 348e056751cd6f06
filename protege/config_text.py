"""Reading a config's text: YAML presets, `a.b=value` overrides, size limits, dotted
assignment into the tree, and validation errors turned into messages that name the key
(with a suggestion for a misspelt one). `protege.config` builds the typed tree from these.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from protege.errors import AlgorithmConfigError, ProtegeError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ProtegeError):
    """A bad configuration value; the message starts with the dotted key path."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; accept exponents without a dot as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def read_preset(preset: str | Path) -> dict[str, Any]:
    path = Path(preset)
    if not path.exists():
        path = CONFIG_DIR / f"{preset}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"no preset {str(preset)!r}; presets in configs/: {known}")
    if not path.is_file():
        raise ConfigError(f"{path}: is not a file; pass a YAML preset file or a preset name")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the preset ({error})") from None
    try:
        tree = _yaml_value(text) or {}
    except ValueError as error:
        raise ConfigError(f"{path}: not a valid YAML preset ({error})".replace("\n", " ")) from None
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{path}: a preset must be a mapping of sections, got {type(tree).__name__}"
        )
    return tree


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    shown = repr(text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)")
    if not sep or not key or not all(part.strip() for part in key.split(".")):
        raise ConfigError(f"override {shown} is not of the form a.b=value")
    try:
        return key, _yaml_value(raw) if raw.strip() else None
    except ValueError as error:
        raise ConfigError(
            f"override {shown}: the value is not valid YAML ({error}); quote it, "
            f"e.g. {key}='\"...\"'".replace("\n", " ")
        ) from None


MAX_DEPTH = 32  # a config is a few levels deep; deeper is a mistake (or a YAML bomb)
MAX_NODES = 100_000  # values after YAML aliases are expanded


def _yaml_value(text: str) -> Any:
    """`text` read as YAML (safe: no tags that construct objects), or a ValueError: bad
    syntax, an integer too long to convert, nesting too deep, or aliases that form a cycle
    or expand past MAX_NODES values (a "billion laughs")."""
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ValueError(str(error)) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    check_size(value)
    return value


def check_size(value: Any) -> None:
    """ValueError unless `value` is a finite tree of at most MAX_DEPTH levels, MAX_NODES
    nodes (a shared alias counts each time it appears)."""
    count = 0
    stack = [(value, 0, frozenset())]  # (node, depth, ids of the containers above it)
    while stack:
        node, depth, above = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ValueError(f"more than {MAX_NODES} values once its aliases are expanded")
        if not isinstance(node, (dict, list, set, tuple)):
            continue
        if id(node) in above:
            raise ValueError("an alias refers to a mapping or list that contains it (a cycle)")
        if depth >= MAX_DEPTH:
            raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else list(node)
        stack.extend((child, depth + 1, above | {id(node)}) for child in children)


def assign_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `dotted` in `tree`; a numeric part indexes a list (`teachers.1.model=...`)."""
    *parents, leaf = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parents):
        if isinstance(node, list):
            node = _list_item(node, part, ".".join(parents[: i + 1]))
            continue
        following = (parents[i + 1 :] or [leaf])[0]
        child = node.setdefault(part, [] if following.isdigit() else {})
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"{'.'.join(parents[: i + 1])}: is a value, cannot set {dotted}")
        node = child
    if isinstance(node, list):
        index = _list_index(node, leaf, dotted)
        node[index] = value
    else:
        node[leaf] = value


def _list_index(items: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) > len(items):
        raise ConfigError(f"{where}: a list of {len(items)} items takes an index 0..{len(items)}")
    if int(part) == len(items):
        items.append({})  # the next index appends an item
    return int(part)


def _list_item(items: list, part: str, where: str) -> Any:
    item = items[_list_index(items, part, where)]
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: is a value, not a section")
    return item


def describe_error(error: ValidationError, root: type[BaseModel]) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"])
        cause = item.get("ctx", {}).get("error")
        if isinstance(cause, AlgorithmConfigError):
            lines.append(str(cause))
        elif item["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key{_suggest(item['loc'], root)}")
        elif item["type"] == "value_error" and not item["loc"]:
            # A whole-model check: its message names the keys itself.
            lines.append(str(item["msg"]).removeprefix("Value error, "))
        else:
            message = str(item["msg"]).removeprefix("Value error, ")
            lines.append(f"{path}: {message} (got {item.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _suggest(loc: tuple, root: type[BaseModel]) -> str:
    """' (did you mean ...?)' for a mistyped key, from the fields of its section (list
    indices in the path are skipped: `teachers.0.modle` looks in the list's item model)."""
    model = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        section = _section_model(model.model_fields[part].annotation)
        if section is None:
            return ""
        model = section
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    valid = ", ".join(model.model_fields)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {valid})"


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds: `Section` itself, or the item model of `list[Section]`."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None
