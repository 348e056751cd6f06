"""Fuzzing the three readers of user input — the config loader (YAML presets and trees), the
`a.b=value` override parser and the JSONL reader: whatever comes in, the only exceptions that
come out are the project's own (ProtegeError: one `error:` block, exit 2), never a library's."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protege.config import Config, config_from_dict, load_config, read_tree
from protege.data import read_jsonl
from protege.errors import ProtegeError

FUZZ = settings(
    max_examples=60,
    deadline=None,  # the first examples import and build algorithms; bounded by max_examples
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Real keys, so the fuzzer reaches the validators and not only "unknown key".
SECTIONS = {
    name: list(getattr(info.annotation, "model_fields", {}) or ["0", "1", "model", "name"])
    for name, info in Config.model_fields.items()
}
KEYS = st.one_of(
    st.sampled_from([f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys]),
    st.sampled_from([*SECTIONS, "algorithm.name", "algorithm.beta", "teacher.model",
                     "teachers.0.model", "teachers.1.name", "teachers.x", "student.lora.r"]),
    st.text(min_size=0, max_size=20),
)  # fmt: skip
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
    st.sampled_from(["gkd", "minillm", "builtin:tiny/student", "topk", "auto", "nan", ".inf"]),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.one_of(st.text(max_size=8), KEYS), inner, max_size=3)
    ),
    max_leaves=8,
)
# What breaks parsers rather than validators: deep nesting, aliases that form a cycle or
# expand exponentially, integers past Python's conversion limit, object-constructing tags.
BILLION_LAUGHS = (
    "[&a [1,1,1,1,1,1,1,1,1,1], "
    + ", ".join(f"&{b} [{', '.join([f'*{a}'] * 10)}]" for a, b in zip("abcde", "bcdef"))
    + "]"
)  # 10^6 values once expanded
NASTY_YAML = st.one_of(
    st.integers(30, 600).map(lambda n: "[" * n + "]" * n),
    st.integers(30, 600).map(lambda n: "{a: " * n + "1" + "}" * n),
    st.integers(4301, 6000).map(lambda n: "9" * n),
    st.sampled_from([
        "&a [*a]", "&a {name: gkd, x: *a}", "[", "{a: 1", "'", "1e400", ".nan", "-.inf",
        "!!python/object/apply:os.system [true]", "!!binary aGk=", "!!set {a}", "2020-01-01",
        BILLION_LAUGHS,
    ]),
)  # fmt: skip
VALUE_TEXT = st.one_of(
    st.text(max_size=30),
    VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
    NASTY_YAML,
)
OVERRIDES = st.lists(st.builds(lambda k, v: f"{k}={v}", KEYS, VALUE_TEXT) | st.text(), max_size=4)


def only_protege_errors(call) -> None:
    try:
        call()
    except ProtegeError:
        pass


@FUZZ
@given(overrides=OVERRIDES)
def test_overrides_raise_only_protege_errors(overrides):
    only_protege_errors(lambda: load_config(None, overrides))


@FUZZ
@given(tree=st.dictionaries(st.one_of(st.sampled_from(list(SECTIONS)), st.text()), VALUES))
def test_config_trees_raise_only_protege_errors(tree):
    only_protege_errors(lambda: config_from_dict(tree))


@FUZZ
@given(
    text=st.one_of(
        st.text(), VALUES.map(yaml.safe_dump), NASTY_YAML, NASTY_YAML.map("trainer: {}".format),
        NASTY_YAML.map("algorithm: {{name: gkd, beta: {}}}".format),
    ),
    overrides=OVERRIDES,
)  # fmt: skip
def test_preset_files_raise_only_protege_errors(tmp_path, text, overrides):
    preset = tmp_path / "preset.yaml"
    preset.write_text(text, encoding="utf-8", errors="surrogatepass")
    only_protege_errors(lambda: load_config(preset, overrides))


@FUZZ
@given(raw=st.binary(max_size=200))
def test_preset_bytes_raise_only_protege_errors(tmp_path, raw):
    preset = tmp_path / "preset.yaml"
    preset.write_bytes(raw)
    only_protege_errors(lambda: read_tree(preset, []))


ROWS = st.one_of(
    st.dictionaries(st.sampled_from(["prompt", "completion", "answer", "x"]), VALUES, max_size=4),
    VALUES,
)


NASTY_JSON = st.one_of(
    st.integers(500, 200_000).map(lambda n: '{"prompt": ' + "[" * n + "]" * n + "}"),
    st.integers(4301, 6000).map(lambda n: '{"prompt": "a", "answer": ' + "9" * n + "}"),
    st.sampled_from(['{"prompt": NaN}', '{"prompt": "\\ud800"}', "[]", "null", '"x"']),
)


@FUZZ
@given(
    lines=st.lists(st.one_of(ROWS.map(json.dumps), st.text(max_size=40), NASTY_JSON), max_size=5)
)
def test_jsonl_text_raises_only_protege_errors(tmp_path, lines):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    only_protege_errors(lambda: read_jsonl(str(data)))


@FUZZ
@given(raw=st.binary(max_size=300))
def test_jsonl_bytes_raise_only_protege_errors(tmp_path, raw):
    data = tmp_path / "train.jsonl"
    data.write_bytes(raw)
    only_protege_errors(lambda: read_jsonl(str(data)))


def test_a_yaml_tag_executes_nothing(tmp_path):
    """YAML is read with the safe loader: a python/object tag is an error, not a call."""
    marker = tmp_path / "ran"
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"x: !!python/object/apply:os.system ['touch {marker}']\n")
    only_protege_errors(lambda: load_config(preset, []))
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    only_protege_errors(lambda: load_config(None, [f"x={tag}"]))
    assert not marker.exists()


def test_a_directory_as_the_preset_is_named(tmp_path):
    try:
        load_config(tmp_path, [])
    except ProtegeError as error:
        assert "is not a file" in str(error)


@pytest.mark.parametrize(
    "override,named",
    [
        ("algorithm.name=[gkd]", "algorithm.name: unknown algorithm"),
        ("algorithm={name: {a: 1}}", "algorithm.name: unknown algorithm"),
        ("algorithm=&a {name: gkd, x: *a}", "a cycle"),
        ("student.lora.r=" + "[" * 400 + "]" * 400, "nested more than 32 levels"),
        ("student.lora.r=" + "[" * 2000 + "]" * 2000, "nested too deeply"),
        ("trainer.steps=" + "9" * 5000, "Exceeds the limit"),
        ("x=" + BILLION_LAUGHS, "more than 100000 values"),
        ("a..b=1", "is not of the form a.b=value"),
    ],
    ids=lambda value: value[:24],
)
def test_what_the_fuzzer_found_is_named(override, named):
    """Each of these was a library exception (RecursionError, TypeError, ValueError)."""
    with pytest.raises(ProtegeError, match=re.escape(named)):
        load_config(None, [override])
