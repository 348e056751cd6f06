"""`--help` lists every config key with its type, default and a one-line doc, generated from
the typed config and the algorithms' sources, without importing torch, Ray or transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protege.algorithms import ALGORITHMS
from protege.config import Config, load_config
from protege.source_docs import builtin_algorithms
from protege.usage import algorithm_help, algorithm_rows_of, section_rows, usage

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "ray", "transformers")


def key_lines(text: str) -> dict[str, str]:
    return {line.split(" (")[0].strip(): line for line in text.splitlines() if " (" in line}


@pytest.mark.parametrize("preset", ["gkd", "minillm", "kv_distill"])
def test_help_shows_every_config_key_with_the_presets_value_and_a_doc(preset):
    lines = key_lines(usage(preset))
    config = load_config(preset)
    for key, kind, value, doc in section_rows(Config, config, ""):
        if key == "algorithm":
            continue
        assert key in lines, key
        assert f"{key} ({kind}) = {value!r}" in lines[key], lines[key]
        assert doc and doc in lines[key], f"{key} has no doc"
    algorithm = ALGORITHMS[config.algorithm["name"]]
    for key, _, value, _ in algorithm_rows_of(algorithm, config.algorithm):
        assert f"{key} (" in lines[key] and f"= {value!r}" in lines[key], key


BUILTIN = sorted(n for n, c in ALGORITHMS.items() if c.__module__.startswith("protege."))


def test_every_builtin_algorithm_is_found_in_the_sources():
    assert sorted(builtin_algorithms()) == BUILTIN


@pytest.mark.parametrize("name", BUILTIN)
def test_algorithm_keys_read_from_source_match_the_imported_dataclass(name):
    """The source reading (no torch) gives the same keys, types and defaults as reflection."""
    _, from_source = algorithm_help({"name": name})
    imported = list(algorithm_rows_of(ALGORITHMS[name], {"name": name}))
    assert [row[:3] for row in from_source] == [row[:3] for row in imported]
    undocumented = [key for key, _, _, doc in from_source if not doc]
    assert undocumented == [], f"give these a comment next to their default: {undocumented}"


def test_help_imports_neither_torch_nor_ray_nor_transformers():
    """The example's real entry point, in a fresh interpreter; sys.modules checked there."""
    code = (
        "import json, runpy, sys\n"
        "sys.argv = ['examples/gkd.py', '--help']\n"
        "try:\n"
        "    runpy.run_path('examples/gkd.py', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    code = done.code\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print(json.dumps({'code': code, 'heavy': heavy}), file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}, done.stderr[-2000:]
    assert done.stdout.startswith("usage: python examples/gkd.py")
    assert "learner.lr (float) = " in done.stdout and "algorithm.beta (float)" in done.stdout
