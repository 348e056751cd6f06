"""Every known bad input is one `error: ...` block on stderr and exit code 2, met before any
worker loads a model; `PROTEGE_DEBUG=1` re-raises with the traceback; `--help` lists every key."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protege.algorithms import ALGORITHMS
from protege.cli import run_example as main
from protege.config import Config, ConfigError, load_config
from protege.errors import ProtegeError
from protege.modeling import resolve_path

ROOT = Path(__file__).resolve().parent.parent
# data.train named: the runs below name their own models, which takes them off the built-in task
LOCAL = [
    "trainer.workers=local",
    "logging.wandb=disabled",
    "logging.progress=false",
    "data.train=builtin:tiny/train",
]


class PipelineReached(Exception):
    """Raised by a stand-in Pipeline: the run got past every driver-side check."""


@pytest.fixture
def no_workers(monkeypatch):
    """Building the Pipeline (where workers load models) fails the test loudly."""

    def refuse(*args, **kwargs):
        raise PipelineReached

    monkeypatch.setattr("protege.run.Pipeline", refuse)


def run_main(tmp_path, *overrides: str, preset: str = "gkd") -> int:
    """The exit code of `python examples/<preset>.py overrides...`, in-process."""
    with pytest.raises(SystemExit) as done:
        main(preset, [*LOCAL, f"output_dir={tmp_path / 'run'}", *overrides])
    return done.value.code


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "override,expected",
    [
        ("trainer.stepz=3", "trainer.stepz: unknown key (did you mean 'steps'?)"),
        ("trainer.steps", "is not of the form a.b=value"),
        ("algorithm.beta=2", "algorithm.beta"),
        ("rollout.temperature=[", "not valid YAML"),
        ("teacher.model=self", "student.lora.enabled=true"),  # a check_setup ValueError
        ("data.train=builtin:tiny/nope", "unknown built-in asset 'builtin:tiny/nope'"),
    ],
)
def test_a_bad_config_is_one_error_block_and_exit_code_2(override, expected, tmp_path, capsys):
    code = run_main(tmp_path, override)
    assert code == 2
    assert expected in one_error(capsys)


def test_a_hub_name_is_refused_before_any_tokenizer_or_worker_loads(
    tmp_path, capsys, monkeypatch, no_workers
):
    def reached(name):
        raise AssertionError(f"tokenizer of {name} loaded before the model paths were checked")

    monkeypatch.setattr("protege.run.load_tokenizer", reached)
    code = run_main(tmp_path, "student.model=Qwen/Qwen3-0.6B")
    assert code == 2
    err = one_error(capsys)
    assert "student.model: 'Qwen/Qwen3-0.6B' is not a local model directory" in err
    assert "protege does not download models at run time (no network)" in err
    assert "`huggingface-cli download Qwen/Qwen3-0.6B --local-dir DIR`" in err


def model_without_weights(tmp_path) -> Path:
    path = tmp_path / "no_weights"
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.mark.parametrize(
    "make,key,expected",
    [
        (lambda t: t / "absent", "teacher.model", "teachers.0.model: '{p}' is not a local model"),
        (model_without_weights, "teacher.model", "teachers.0.model: {p} has no weights"),
        (lambda t: t / "absent", "reward.models", "reward.models.0.path: '{p}' is not a local"),
        (model_without_weights, "student.model", "student.model: {p} has no weights"),
    ],
)
def test_every_model_path_is_checked_before_workers(
    make, key, expected, tmp_path, capsys, no_workers
):
    path = make(tmp_path)
    override = f"reward.models=[{{path: {path}}}]" if key == "reward.models" else f"{key}={path}"
    code = run_main(tmp_path, override, preset="rl_distill" if "reward" in key else "gkd")
    assert code == 2
    assert expected.format(p=path) in one_error(capsys)


def test_a_reward_model_with_several_labels_is_refused_before_workers(tmp_path, capsys, no_workers):
    code = run_main(tmp_path, "reward.models=[{path: builtin:tiny/teacher}]", preset="rl_distill")
    assert code == 2
    err = one_error(capsys)
    assert "reward.models.0.path: 'builtin:tiny/teacher' is a " in err
    assert "not a sequence-classification reward model" in err


def test_output_dir_must_be_a_writable_directory(tmp_path, capsys, no_workers):
    afile = tmp_path / "afile"
    afile.write_text("")
    for output_dir, expected in [
        (afile, "is a file, not a directory"),
        (afile / "sub", f"cannot be created: {afile} is a file"),
    ]:
        with pytest.raises(SystemExit) as done:
            main("gkd", [*LOCAL, f"output_dir={output_dir}"])
        assert done.value.code == 2
        assert f"output_dir: {output_dir}" in one_error(capsys)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(SystemExit):
            main("gkd", [*LOCAL, f"output_dir={locked / 'run'}"])
        assert "is not writable" in one_error(capsys)


def test_data_that_is_not_utf8_names_file_line_and_byte(tmp_path, capsys, no_workers):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": "caf\xe9"}\n')
    code = run_main(tmp_path, f"data.train={data}")
    assert code == 2
    assert f"{data}:2: not UTF-8: byte 0xe9 at byte offset 53" in one_error(capsys)


def write_rows(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "completion": "2"}) + "\n" for p in prompts))
    return path


def test_an_overlong_prompt_is_refused_naming_its_line(tmp_path, capsys, no_workers):
    data = write_rows(tmp_path / "train.jsonl", ["1+1=", "1+1=", "9" * 300])
    code = run_main(tmp_path, f"data.train={data}")
    assert code == 2
    err = one_error(capsys)
    assert f"{data}:3: the prompt is" in err and "over data.max_prompt_tokens=256" in err
    assert err.count("\n") == 1  # the tokenizer's own length warning is not printed


@pytest.mark.parametrize(
    "overlong,counts", [("truncate_left", "1 truncated"), ("drop", "1 dropped")]
)
def test_the_first_line_counts_truncated_or_dropped_rows(
    overlong, counts, tmp_path, capsys, no_workers
):
    data = write_rows(tmp_path / "train.jsonl", ["1+1=", "2+2=", "9" * 300])
    # 40 + 8 new tokens fit the tiny models' 64 positions (a 256-token prompt would not)
    limit = ["data.max_prompt_tokens=40", f"data.overlong={overlong}"]
    with pytest.raises(PipelineReached):
        main("gkd", [*LOCAL, f"output_dir={tmp_path}", f"data.train={data}", *limit])
    first = capsys.readouterr().err.splitlines()[0]
    rows = 3 if overlong == "truncate_left" else 2
    assert first.startswith(f"[protege] data.train: {rows} rows from {data}")
    assert counts in first and "data.max_prompt_tokens=40" in first


def test_a_tokenizer_without_eos_is_one_error_block(tmp_path, capsys, no_workers):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = tmp_path / "student"
    AutoModelForCausalLM.from_pretrained(resolve_path("builtin:tiny/student")).save_pretrained(
        student
    )
    tokenizer = AutoTokenizer.from_pretrained(resolve_path("builtin:tiny/student"))
    tokenizer.eos_token = None
    tokenizer.save_pretrained(student)
    capsys.readouterr()  # the saving above reports progress
    code = run_main(tmp_path, f"student.model={student}")
    assert code == 2
    err = one_error(capsys)
    assert f"the tokenizer of '{student}' has no EOS token" in err and "eos_token" in err


def test_debug_mode_reraises_with_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTEGE_DEBUG", "1")
    with pytest.raises(ConfigError, match="trainer.stepz"):
        main("gkd", [*LOCAL, "trainer.stepz=3"])


def test_known_error_types_are_protege_errors():
    from protege.algorithms.registry import AlgorithmConfigError
    from protege.data import DataError
    from protege.errors import SetupError
    from protege.eval.standalone import InputError

    for kind in (ConfigError, DataError, InputError, SetupError, AlgorithmConfigError):
        assert issubclass(kind, ProtegeError) and issubclass(kind, ValueError)


def leaf_keys(model, prefix=""):
    from protege.usage import _is_list, _section

    for name, info in model.model_fields.items():
        section = _section(info.annotation)
        if section is None:
            yield f"{prefix}{name}"
            continue
        if _is_list(info.annotation):
            yield f"{prefix}{name}"
        yield from leaf_keys(
            section, f"{prefix}{name}.N." if _is_list(info.annotation) else f"{prefix}{name}."
        )


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_key_with_type_default_and_doc(flag, capsys):
    with pytest.raises(SystemExit) as done:
        main("minillm", ["trainer.steps=3", flag])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python examples/minillm.py [a.b=value ...]")
    lines = {line.split(" (")[0].strip(): line for line in out.splitlines() if " (" in line}
    for key in leaf_keys(Config):
        if key != "algorithm":
            assert key in lines, key
    assert (
        "  trainer.batch_size (int) = " in out and "prompts per step" in lines["trainer.batch_size"]
    )
    assert "(error|truncate_left|drop) = 'error'" in lines["data.overlong"]
    preset = load_config("minillm")
    assert f"= {preset.trainer.steps!r}" in lines["trainer.steps"]  # the preset's value
    for field in dataclasses.fields(ALGORITHMS["minillm"]):
        if field.init:
            assert f"algorithm.{field.name}" in lines, field.name


@pytest.mark.slow  # fresh interpreters import torch and transformers
def test_examples_exit_2_with_one_block_and_help_exits_0(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("PROTEGE_DEBUG", None)

    def example(*args: str, name: str = "gkd", **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "examples" / f"{name}.py"), *args],
            capture_output=True,
            text=True,
            env={**env, **extra},
            timeout=300,
            check=False,
        )

    bad = example("trainer.stepz=3")
    assert bad.returncode == 2 and bad.stdout == ""
    assert (
        bad.stderr
        == "error: invalid config:\n  trainer.stepz: unknown key (did you mean 'steps'?)\n"
    )
    debug = example("trainer.stepz=3", PROTEGE_DEBUG="1")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
    shown = example("--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: python examples/gkd.py")
    assert "trainer.batch_size (int)" in shown.stdout and "algorithm.beta (float)" in shown.stdout
    kv = example("trainer.stepz=1", name="kv_distill")  # its own config tree, the same handler
    assert kv.returncode == 2 and "Traceback" not in kv.stderr
    assert "error: invalid config:\n  trainer.stepz: unknown key" in kv.stderr
