"""Several token-level teachers in a run (issue 14): what is refused before any model loads,
and in-process runs whose learner fuses the teachers and reports each one's metrics."""

from __future__ import annotations

import json

import pytest
import yaml

from protege.config import CONFIG_DIR, load_config
from protege.data import DataError
from protege.errors import SetupError
from protege.run import build_controller


def _config(tmp_path, preset: str, *overrides: str, fusion: dict | None = None, rows=None):
    """Preset `preset` with teachers `a` (the shipped teacher) and `b` (teacher_b, weight 3),
    every role in-process."""
    tree = yaml.safe_load((CONFIG_DIR / f"{preset}.yaml").read_text())
    tree["teachers"] = [
        {"name": "a", "model": "builtin:tiny/teacher"},
        {"name": "b", "model": "builtin:tiny/teacher_b", "weight": 3.0},
    ]
    tree["fusion"] = fusion or {"mode": "fixed"}
    if rows is not None:
        path = tmp_path / "train.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        tree.setdefault("data", {})["train"] = str(path)
    preset_file = tmp_path / "preset.yaml"
    preset_file.write_text(yaml.safe_dump(tree))
    base = [
        "trainer.workers=local",
        "logging.wandb=disabled",
        "logging.progress=false",
        f"output_dir={tmp_path / 'run'}",
        "data.test=null",
        "trainer.batch_size=4",
        "trainer.steps=2",
    ]
    return load_config(preset_file, [*base, *overrides])


ROWS = [
    {"prompt": "1+2=", "completion": "3<eos>", "answer": "3", "teacher": "a"},
    {"prompt": "60+70=", "completion": "130<eos>", "answer": "130", "teacher": "b"},
    {"prompt": "5+5=", "completion": "10<eos>", "answer": "10", "teacher": "a"},
    {"prompt": "90+20=", "completion": "110<eos>", "answer": "110", "teacher": "b"},
]


def test_a_row_naming_an_unknown_teacher_is_one_loud_error(tmp_path):
    rows = [*ROWS[:3], {**ROWS[3], "teacher": "c"}]
    config = _config(tmp_path, "gkd", fusion={"mode": "route"}, rows=rows)
    with pytest.raises(
        DataError, match=r"train.jsonl:4: teacher='c' is not one of the teachers \['a', 'b'\]"
    ):
        build_controller(config)


def test_a_row_naming_no_teacher_needs_a_default(tmp_path):
    rows = [*ROWS[:3], {k: v for k, v in ROWS[3].items() if k != "teacher"}]
    config = _config(tmp_path, "gkd", fusion={"mode": "route"}, rows=rows)
    with pytest.raises(DataError, match="train.jsonl:4: .*no 'teacher' field.*fusion.default"):
        build_controller(config)


@pytest.mark.parametrize(
    ("preset", "fusion", "overrides", "match"),
    [
        ("gkd", {"mode": "route", "default": "c"}, (), "fusion.default='c' is not one of"),
        ("opd", {"mode": "confidence"}, (), "fusion.mode=confidence weighs teachers"),
        ("minillm", {"mode": "fixed"}, (), "teacher-steered decoding"),
    ],
)
def test_fusions_that_cannot_run_are_refused_before_models_load(
    tmp_path, preset, fusion, overrides, match
):
    with pytest.raises(SetupError, match=match):
        build_controller(_config(tmp_path, preset, *overrides, fusion=fusion))


def test_all_zero_weights_are_refused(tmp_path):
    config = _config(tmp_path, "gkd", "teachers.0.weight=0.0", "teachers.1.weight=0.0")
    with pytest.raises(SetupError, match="every teachers.N.weight is 0"):
        build_controller(config)


def _metrics(config) -> list[dict]:
    with open(f"{config.output_dir}/metrics.jsonl") as lines:
        rows = [json.loads(line) for line in lines]
    return [row for row in rows if "learner/loss" in row]


def test_routed_gkd_run_reports_each_teacher(tmp_path):
    config = _config(tmp_path, "gkd", "algorithm.topk=8", fusion={"mode": "route"}, rows=ROWS * 2)
    build_controller(config).run()
    for row in _metrics(config):
        assert row["teacher/a/share"] + row["teacher/b/share"] == pytest.approx(1.0)
        assert 0 < row["teacher/a/share"] < 1  # both halves of every batch are routed
        for name in ("a", "b"):
            assert row[f"teacher/{name}/reverse_kl"] > 0
            assert row[f"teacher/{name}/seconds"] > 0
        assert row["teacher/seconds"] == pytest.approx(
            row["teacher/a/seconds"] + row["teacher/b/seconds"]
        )


def test_fixed_mixture_feeds_the_advantages_of_opd(tmp_path):
    """OPD reads teacher_logprobs at the controller: the fused log-probs are there."""
    config = _config(tmp_path, "opd")
    build_controller(config).run()
    for row in _metrics(config):
        assert row["teacher/a/share"] == pytest.approx(0.25, abs=1e-5)
        assert row["teacher/b/share"] == pytest.approx(0.75, abs=1e-5)
