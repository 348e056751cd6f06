"""Typed config: presets load, overrides merge, and every bad key or value is a ConfigError
whose message names the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from protege.algorithms import ALGORITHMS
from protege.config import CONFIG_DIR, Config, ConfigError, load_config

# configs/osd.yaml configures the OSD serving loop, not a training run (tests/test_osd_serving.py)
PRESETS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if p.stem != "osd")


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads_by_name_and_by_path(preset: Path):
    by_name = load_config(preset.stem)
    assert by_name == load_config(preset)
    algorithm = by_name.build_algorithm()
    assert algorithm.name == by_name.algorithm["name"]
    algorithm.plan(0)


def test_defaults_without_a_preset():
    config = load_config(None)
    assert config == Config()
    assert config.algorithm == {"name": "gkd"}
    assert config.build_algorithm().name == "gkd"
    assert config.student.model == "builtin:tiny/student"
    assert config.teacher.model == "builtin:tiny/teacher"
    assert config.rollout.backend == "hf"


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.stepz=3", "trainer.stepz"),  # typo
        ("trainer.steps=abc", "trainer.steps"),  # wrong type
        ("trainer.steps=1.5", "trainer.steps"),  # float for an int
        ("trainer.steps=-1", "trainer.steps"),  # out of range
        ("trainer.steps=true", "trainer.steps"),  # a bool is not an int
        ("algorithm.seq_kd=1", "algorithm.seq_kd"),  # an int is not a bool
        ("learner.lr=0", "learner.lr"),
        ("rollout.backend=sglang", "rollout.backend"),
        ("algorithm.beta=2", "algorithm.beta"),  # out of range for the algorithm
        ("algorithm.beta=abc", "algorithm.beta"),  # wrong type for the algorithm
        ("algorithm.betta=0.5", "algorithm.betta"),  # unknown algorithm key
        ("algorithm.name=nope", "algorithm.name"),  # unknown algorithm
        ("student.lora.r=0", "student.lora.r"),  # nested section
        ("nosuchsection.x=1", "nosuchsection"),
    ],
)
def test_bad_values_name_the_dotted_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert key in str(error.value)


def test_typo_suggests_the_right_key():
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_config(None, ["trainer.stepz=3"])


def test_unknown_algorithm_lists_the_registered_ones():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["algorithm.name=nope"])
    assert all(name in str(error.value) for name in ALGORITHMS)


def test_numbers_parse_as_numbers():
    config = load_config(None, ["learner.lr=1e-4", "rollout.temperature=1", "trainer.steps=7"])
    assert config.learner.lr == 1e-4 and isinstance(config.learner.lr, float)
    assert config.rollout.temperature == 1.0
    assert config.trainer.steps == 7 and isinstance(config.trainer.steps, int)


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="a.b=value"):
        load_config(None, ["trainer.steps"])


def test_overrides_merge_into_the_preset_algorithm_section(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text(
        "algorithm:\n  name: minillm\n  mix_alpha: 0.3\n  lm_coef: 0.5\n"
        "learner:\n  lr: 1e-4\ntrainer:\n  steps: 5\n"
    )
    config = load_config(preset, ["algorithm.gamma=0.9", "trainer.batch_size=4"])
    assert config.algorithm == {"name": "minillm", "mix_alpha": 0.3, "lm_coef": 0.5, "gamma": 0.9}
    assert config.learner.lr == 1e-4  # YAML 1.1 would read "1e-4" as a string
    assert (config.trainer.steps, config.trainer.batch_size) == (5, 4)
    algorithm = config.build_algorithm()
    assert (algorithm.mix_alpha, algorithm.lm_coef, algorithm.gamma) == (0.3, 0.5, 0.9)
    with pytest.raises(ConfigError, match=r"algorithm\.beta"):  # gkd's key, not minillm's
        load_config(preset, ["algorithm.beta=0.5"])


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_overrides_merge(preset: Path):
    config = load_config(preset.stem, ["trainer.steps=3"])
    assert config.trainer.steps == 3
    assert config.algorithm == load_config(preset.stem).algorithm


def test_algorithm_section_without_a_name_uses_the_default_algorithm():
    config = load_config(None, ["algorithm.beta=0.1"])
    assert config.algorithm == {"name": "gkd", "beta": 0.1}


def test_missing_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="no preset"):
        load_config("does-not-exist")


def test_a_preset_must_be_a_mapping(tmp_path):
    preset = tmp_path / "list.yaml"
    preset.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(preset)


def test_config_is_frozen():
    config = load_config(None)
    with pytest.raises(ValidationError, match="frozen"):
        config.trainer.steps = 5


@pytest.mark.parametrize(
    "override, key",
    [
        ("learner.lr=.inf", "learner.lr"),
        ("learner.max_grad_norm=.inf", "learner.max_grad_norm"),
        ("rollout.temperature=.nan", "rollout.temperature"),
        ("reward.rules.0.weight=.inf", "reward.rules.0.weight"),
        ("algorithm.beta=.nan", "algorithm.beta"),
        ("algorithm.name=minillm", None),  # a finite default stays fine
    ],
)
def test_every_float_key_must_be_finite(override, key):
    overrides = [override, "reward.rules.0.name=exact_match"] if "rules" in override else [override]
    if key is None:
        load_config(None, overrides)
        return
    with pytest.raises(ConfigError, match=rf"{key}: must be a finite number"):
        load_config(None, overrides)


def test_resume_is_false_true_or_auto():
    assert [
        load_config(None, [f"trainer.resume={v}"]).trainer.resume for v in ("false", "true", "auto")
    ] == [False, True, "auto"]
    with pytest.raises(ConfigError, match="trainer.resume"):
        load_config(None, ["trainer.resume=maybe"])
