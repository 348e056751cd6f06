"""Privileged-context teachers: a teacher that sees its own prompt scores the student's
response tokens exactly as a forward on teacher prompt ⧺ response does, for every placement
that runs on CPU (its own HF scorer, the learner's adapter-off base, the learner's live
weights), and equals the ordinary teacher when its prompt is the student's."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from protege.actors.teacher import TeacherScorer
from protege.config import ConfigError, config_from_dict, load_config
from protege.data import DataError, PromptSource, read_jsonl
from protege.launch import LocalHandle
from protege.modeling import load_model, load_tokenizer
from protege.privileged import view_texts
from protege.prompt_views import template_fields
from protege.records import RolloutBatch, RolloutPlan, concat
from protege.teachers import TeacherClient

ROWS = [
    {"prompt": "12+34=", "answer": "46", "hint": "46;"},
    {"prompt": "7+5=", "answer": "12", "hint": "12;"},
    {"prompt": "99+1=", "answer": "100", "hint": "100;"},
    {"prompt": "0+0=", "answer": "0", "hint": "0;"},
]
PLANS = [
    RolloutPlan(teacher_need="sampled"),
    RolloutPlan(teacher_need="topk", topk=5, temperature=2.0),
    RolloutPlan(teacher_need="full"),
]


def write_rows(path, rows=ROWS) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def source(tiny_dirs, train: str, *teacher_keys: str) -> PromptSource:
    """The rows served with each `teachers.0.<key>=...` privileged view, as a run reads them."""
    config = load_config(
        None,
        [f"student.model={tiny_dirs['student']}", f"data.train={train}"]
        + [f"teachers.0.{key}" for key in teacher_keys],
    )
    tokenizer = load_tokenizer(tiny_dirs["student"])
    return PromptSource(
        read_jsonl(train), tokenizer, batch_size=len(ROWS), teacher_views=view_texts(config)
    )


def rollout(prompts, seed: int = 0, width: int = 5) -> RolloutBatch:
    """The served prompts with random right-padded responses of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = prompts.size
    lengths = torch.tensor([width, 1, 3, width - 1])[:rows]
    mask = torch.arange(width) < lengths[:, None]
    ids = torch.randint(4, 30, (rows, width), generator=g).masked_fill(~mask, 0)
    return RolloutBatch(
        prompts.prompt_ids, prompts.prompt_mask, ids, mask, teacher_prompts=prompts.teacher_prompts
    )


def privileged(plan: RolloutPlan) -> RolloutPlan:
    return RolloutPlan(**{**plan.__dict__, "teacher_prompt": "teacher"})


def brute_force_logprobs(model, batch: RolloutBatch, name: str = "teacher") -> torch.Tensor:
    """log p(y_t) [B,T] row by row, unpadded: one forward on teacher prompt ⧺ response."""
    out = torch.zeros(batch.response_ids.shape)
    prompts = batch.teacher_prompts
    for row in range(batch.size):
        prompt = prompts.ids[name][row][prompts.mask[name][row]]
        response = batch.response_ids[row][batch.response_mask[row]]
        with torch.no_grad():
            logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0].double()
        logp = logits[len(prompt) - 1 : -1].log_softmax(-1)
        out[row, : len(response)] = logp.gather(-1, response[:, None])[:, 0].float()
    return out


@pytest.fixture(scope="module")
def train(tmp_path_factory) -> str:
    return write_rows(tmp_path_factory.mktemp("rows") / "train.jsonl")


@pytest.fixture(scope="module")
def scorer(tiny_dirs) -> TeacherScorer:
    return TeacherScorer(tiny_dirs["teacher"], micro_batch_size=3)


# -- templates and config --------------------------------------------------------------
def test_template_fields_are_plain_names_only():
    assert template_fields("{answer};{prompt}") == ["answer", "prompt"]
    assert template_fields("{{literal}} {prompt}") == ["prompt"]
    for bad, why in (
        ("{a.b}", "not a plain row field"),
        ("{a[0]}", "not a plain row field"),
        ("{}", "not a plain row field"),
        ("{0}", "not a plain row field"),
        ("{a!r}", "conversions and format specs"),
        ("{a:>99999999}", "conversions and format specs"),
        ("{prompt", "literal brace"),
        ("no fields", "names no row field"),
    ):
        with pytest.raises(ValueError, match=why):
            template_fields(bad)


@pytest.mark.parametrize(
    "keys, message",
    [
        (["prompt_template='{__class__.__mro__}'"], "teachers.0: prompt_template"),
        (["prompt_template='{a}'", "prompt_field=hint"], "not both"),
        (["live=true"], "set model: self"),
        (["model=self", "live=true"], "without prompt_field or prompt_template"),
        (["model=self", "live=true", "prompt_field=hint", "backend=vllm"], "backend: hf"),
        (
            ["backend=server", "url=http://127.0.0.1:1", "prompt_field=hint"],
            "server teacher scores the student's own prompt only",
        ),
    ],
)
def test_bad_privileged_keys_are_one_config_error(keys, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"teachers.0.{key}" for key in keys])


# -- data ------------------------------------------------------------------------------
def test_teacher_prompts_are_the_rendered_rows_tokenised_like_the_student_prompt(tiny_dirs, train):
    served = source(tiny_dirs, train, "prompt_template='{answer};{prompt}'").next(0)
    tokenizer = load_tokenizer(tiny_dirs["student"])
    prompts = served.teacher_prompts
    for row in range(served.size):
        ids = prompts.ids["teacher"][row][prompts.mask["teacher"][row]].tolist()
        student = served.prompt_ids[row][served.prompt_mask[row]].tolist()
        text = tokenizer.decode(student)
        answer = next(r["answer"] for r in ROWS if r["prompt"] == text)
        assert ids == tokenizer(f"{answer};{text}")["input_ids"]
        assert not prompts.mask["teacher"][row][: -len(ids)].any()  # left-padded


def test_a_row_missing_a_field_is_named_with_its_file_and_line(tiny_dirs, tmp_path):
    rows = [*ROWS[:2], {"prompt": "1+1=", "answer": "2"}]
    train = write_rows(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"train.jsonl:3: no text field 'hint'.*prompt_field"):
        source(tiny_dirs, train, "prompt_field=hint")
    with pytest.raises(DataError, match=r"train.jsonl:3: no text field 'hint'.*prompt_template"):
        source(tiny_dirs, train, "prompt_template='{hint}{prompt}'")


def test_teacher_prompts_survive_shards_concat_pickle_and_checkpoint_files(
    tiny_dirs, train, tmp_path
):
    from protege.rollout_files import load_rollouts, save_rollouts
    from protege.rollouts import Submitted

    prompts = source(tiny_dirs, train, "prompt_field=hint").next(0)
    batch = rollout(prompts)
    whole = concat(batch.shards(3))
    again = pickle.loads(pickle.dumps(batch))
    save_rollouts(tmp_path, {1: Submitted(prompts, [batch])})
    restored = load_rollouts(tmp_path)[1]
    for copy in (whole, again, restored.shards[0]):
        assert torch.equal(
            copy.teacher_prompts.ids["teacher"], batch.teacher_prompts.ids["teacher"]
        )
        assert torch.equal(
            copy.teacher_prompts.mask["teacher"], batch.teacher_prompts.mask["teacher"]
        )
    assert torch.equal(
        restored.prompts.teacher_prompts.ids["teacher"], prompts.teacher_prompts.ids["teacher"]
    )
    two = batch.teacher_prompts.repeat(2)
    assert torch.equal(two.ids["teacher"][::2], batch.teacher_prompts.ids["teacher"])


# -- scoring ---------------------------------------------------------------------------
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.teacher_need)
def test_a_privileged_prompt_equal_to_the_students_gives_the_ordinary_scores(
    tiny_dirs, train, scorer, plan
):
    batch = rollout(source(tiny_dirs, train, "prompt_template='{prompt}'").next(0))
    ordinary = scorer.score(batch, plan)
    viewed = scorer.score(batch, privileged(plan))
    for name in (
        "teacher_logprobs",
        "teacher_topk_ids",
        "teacher_topk_logprobs",
        "teacher_tail_logprobs",
        "teacher_logits",
    ):
        if getattr(ordinary, name) is not None:
            assert torch.equal(getattr(viewed, name), getattr(ordinary, name)), name
    assert torch.equal(viewed.prompt_ids, batch.prompt_ids)  # handed back as the student's


def test_a_different_prompt_scores_teacher_prompt_then_response(tiny_dirs, train, scorer):
    batch = rollout(source(tiny_dirs, train, "prompt_template='{answer};{prompt}'").next(0))
    plan = RolloutPlan(teacher_need="sampled")
    viewed = scorer.score(batch, privileged(plan)).teacher_logprobs
    expected = brute_force_logprobs(scorer.model, batch)
    torch.testing.assert_close(viewed, expected, rtol=0, atol=1e-5)
    ordinary = scorer.score(batch, plan).teacher_logprobs
    assert (viewed - ordinary).abs().max() > 1e-3  # the hint changes what the teacher says


def test_a_batch_without_the_teachers_prompt_is_refused(tiny_dirs, train, scorer):
    batch = rollout(source(tiny_dirs, train, "prompt_template='{prompt}'").next(0))
    bare = batch.replace(teacher_prompts=None)
    with pytest.raises(ValueError, match="carries none for it"):
        scorer.score(bare, privileged(PLANS[0]))


def test_the_client_names_its_prompt_only_when_privileged(tiny_dirs, train, scorer):
    batch = rollout(source(tiny_dirs, train, "prompt_template='{answer};{prompt}'").next(0))
    plan = PLANS[0]
    plain = TeacherClient("teacher", "actors", [LocalHandle(scorer)])
    hinted = TeacherClient("teacher", "actors", [LocalHandle(scorer)], privileged=True)
    out_plain = plain.score([batch], plan)[0]  # in-process handles answer at once
    out_hinted = hinted.score([batch], plan)[0]
    assert torch.equal(out_plain.teacher_logprobs, scorer.score(batch, plan).teacher_logprobs)
    assert torch.equal(
        out_hinted.teacher_logprobs, scorer.score(batch, privileged(plan)).teacher_logprobs
    )


def learner_config(tiny_dirs, train: str, lora: bool, *teacher: str):
    tree = {
        "student": {"model": tiny_dirs["student"], "lora": {"enabled": lora, "r": 4}},
        "teacher": {"model": "self", "micro_batch_size": 3},
        "algorithm": {"name": "gkd", "teacher_output": "full"},
        "learner": {"lr": 1e-2},
        "trainer": {"steps": 2},
        "data": {"train": train},
    }
    for item in teacher:
        key, value = item.split("=", 1)
        tree["teacher"][key] = value == "true" or value
    return config_from_dict(tree)


@pytest.mark.parametrize("live", [False, True], ids=["base", "live"])
def test_the_learners_self_teachers_score_their_privileged_view(tiny_dirs, train, scorer, live):
    """The adapter-off base (LoRA) and the live student (no LoRA: its current weights,
    after an update moved them) score on their privileged prompt like a brute-force forward,
    and like the ordinary self-teacher when that prompt is the student's."""
    from protege.actors.learner import Learner

    lora = not live
    extra = ["live=true"] if live else []
    learner = Learner(learner_config(tiny_dirs, train, lora, "prompt_template={prompt}", *extra))
    score = learner.score_live if live else learner.score_as_teacher
    batch = rollout(source(tiny_dirs, train, "prompt_template='{prompt}'").next(0))
    learner.train(scorer.score(batch, PLANS[2]))  # one update towards the other teacher
    if live:
        ordinary = learner.self_scored(batch, PLANS[2])  # the current student itself
    else:
        ordinary = learner.score_as_teacher(batch, PLANS[2])
    plan = privileged(PLANS[2])
    assert torch.equal(score(batch, plan).teacher_logits, ordinary.teacher_logits)
    hint = rollout(source(tiny_dirs, train, "prompt_template='{answer};{prompt}'").next(0))
    model = learner.model.eval()
    with model.disable_adapter() if lora else torch.no_grad():
        expected = brute_force_logprobs(model, hint)
    model.train()
    torch.testing.assert_close(score(hint, plan).teacher_logprobs, expected, rtol=0, atol=1e-5)
    if live:  # the live teacher moved with the update: not the initial student any more
        initial = brute_force_logprobs(load_model(tiny_dirs["student"]).eval(), hint)
        assert (expected - initial).abs().max() > 1e-4


# -- runs ------------------------------------------------------------------------------
def local_config(preset: str, tmp_path, *overrides: str):
    base = [
        "trainer.workers=local",
        "logging.wandb=disabled",
        "logging.progress=false",
        f"output_dir={tmp_path / 'run'}",
        "trainer.eval_size=8",
        "trainer.steps=2",
        "trainer.batch_size=4",
    ]
    return load_config(preset, [*base, *overrides])


HINT = "teacher.prompt_template='{answer};{prompt}'"


@pytest.mark.parametrize(
    "preset, overrides, message",
    [
        ("minillm", [HINT], "steer responses while sampling"),
        ("gkd", [HINT, "trainer.eval_samples=2", "trainer.eval_teacher_kl=true"], "KL to the"),
        ("gkd", ["teacher.prompt_template='" + "0" * 60 + "{prompt}'"], "over the 64 positions"),
        ("gkd", ["teacher.prompt_field=solution"], r"train.jsonl:1: no text field 'solution'"),
    ],
)
def test_what_a_privileged_teacher_cannot_do_is_refused_before_training(
    preset, overrides, message, tmp_path
):
    from protege.errors import ProtegeError
    from protege.run import build_controller

    with pytest.raises(ProtegeError, match=message):
        build_controller(local_config(preset, tmp_path, *overrides))


@pytest.mark.parametrize(
    "overrides",
    [[], ["teacher.model=self", "teacher.live=true"]],
    ids=["frozen copy", "live self"],
)
def test_the_privileged_example_trains_on_the_hinted_teachers_scores(overrides, tmp_path):
    """The preset end to end in-process, with its frozen hinted copy (an HF scorer) and
    with the live self-teacher (scored by the learner): their divergence from the student is
    not zero, where the same model on the student's own prompt would be the student."""
    from protege.run import build_controller

    config = local_config("privileged", tmp_path, *overrides)
    result = build_controller(config).run()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [row for row in map(json.loads, lines) if "learner/loss" in row]
    assert [row["step"] for row in steps] == [0, 1]
    assert all(0.01 < row["gkd/jsd"] < 10 for row in steps), steps
    assert 0.0 <= result["eval_after/accuracy"] <= 1.0
