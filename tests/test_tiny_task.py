"""The built-in tiny task: data files, tokenizer, shipped teacher/student (SPEC §5)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoTokenizer

from protege.tasks.tiny import (
    answer_of,
    build_char_tokenizer,
    build_tiny_models,
    exact_match,
    greedy_accuracy,
    load_rows,
    load_student,
    load_teacher,
    load_tokenizer,
    make_rows,
    pretrain_path,
    student_path,
    teacher_path,
    tokenizer_path,
    train_path,
)
from protege.tasks.tiny import test_path as tiny_test_path  # a bare `test_path` would be collected


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def test_rows():
    return load_rows(tiny_test_path())


@pytest.fixture(scope="module")
def train_rows():
    return load_rows(train_path())


# --- shipped models ---------------------------------------------------------------------


def test_teacher_is_accurate_and_student_is_weak_but_not_zero(tokenizer, test_rows):
    teacher_accuracy = greedy_accuracy(load_teacher(), tokenizer, test_rows)
    student_accuracy = greedy_accuracy(load_student(), tokenizer, test_rows)
    assert teacher_accuracy >= 0.9
    assert 0.0 < student_accuracy <= 0.5
    assert teacher_accuracy - student_accuracy >= 0.4


def test_left_padded_batches_match_one_prompt_at_a_time(tokenizer, test_rows):
    student = load_student()
    rows = test_rows[:24]  # prompts of 3 to 5 characters, so batches are really padded
    assert len({len(r["prompt"]) for r in rows}) > 1
    per_row = [greedy_accuracy(student, tokenizer, [row], batch_size=1) for row in rows]
    assert greedy_accuracy(student, tokenizer, rows, batch_size=8) == sum(per_row) / len(rows)


def test_model_dirs_are_self_contained(tokenizer):
    for path in (teacher_path(), student_path()):
        assert os.path.exists(os.path.join(path, "model.safetensors"))
        local = AutoTokenizer.from_pretrained(path)
        assert local.get_vocab() == tokenizer.get_vocab()
        model = load_teacher() if path == teacher_path() else load_student()
        assert model.config.vocab_size == len(tokenizer)
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id
        assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_untrained_models_are_differently_seeded_and_deterministic():
    teacher, student = build_tiny_models(seed=0)
    _, student_again = build_tiny_models(seed=0)
    _, other_student = build_tiny_models(seed=5)
    assert 0.6e6 < sum(p.numel() for p in teacher.parameters()) < 1.0e6
    assert 60e3 < sum(p.numel() for p in student.parameters()) < 90e3
    student_weights = student.model.embed_tokens.weight
    assert torch.equal(student_weights, student_again.model.embed_tokens.weight)
    assert not torch.equal(student_weights, other_student.model.embed_tokens.weight)


# --- tokenizer --------------------------------------------------------------------------


def test_tokenizer_round_trips_and_has_special_tokens(tokenizer):
    assert 28 <= len(tokenizer) <= 40
    for token in ("pad", "eos", "bos", "unk"):
        assert getattr(tokenizer, f"{token}_token_id") is not None
    text = "47+38=85 (9-3)*2/1<>.,:;?!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tokenizer.decode(ids) == text
    with_eos = tokenizer("12+3=15<eos>")["input_ids"]
    assert with_eos[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(with_eos, skip_special_tokens=True) == "12+3=15"
    assert tokenizer("x")["input_ids"] == [tokenizer.unk_token_id]


def test_tokenizer_concatenates_and_left_pads(tokenizer):
    row = make_rows(1, seed=0)[0]
    joint = tokenizer(row["prompt"] + row["completion"])["input_ids"]
    assert (
        joint == tokenizer(row["prompt"])["input_ids"] + tokenizer(row["completion"])["input_ids"]
    )
    batch = tokenizer(["1+2=", "10+20="], padding=True, padding_side="left")
    assert batch["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2
    assert batch["attention_mask"][0] == [0, 0, 1, 1, 1, 1]


def test_built_tokenizer_matches_the_shipped_one(tokenizer):
    assert build_char_tokenizer().get_vocab() == tokenizer.get_vocab()
    assert AutoTokenizer.from_pretrained(tokenizer_path()).get_vocab() == tokenizer.get_vocab()


# --- data -------------------------------------------------------------------------------


def test_shipped_data_is_well_formed_and_disjoint_from_test(train_rows, test_rows):
    assert len(train_rows) == 2000 and len(test_rows) == 200
    for row in train_rows + test_rows:
        a, b = row["prompt"].rstrip("=").split("+")
        assert row["answer"] == str(int(a) + int(b))
        assert row["completion"] == row["answer"] + "<eos>"
    test_prompts = {r["prompt"] for r in test_rows}
    assert len(test_prompts) == len(test_rows)
    assert not test_prompts & {r["prompt"] for r in train_rows}
    with open(pretrain_path(), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) >= 1000
    assert not test_prompts & {line.split("=")[0] + "=" for line in lines}


def test_make_rows_is_deterministic_distinct_and_respects_exclude():
    rows = make_rows(500, seed=7)
    assert rows == make_rows(500, seed=7)
    assert rows != make_rows(500, seed=8)
    assert len({r["prompt"] for r in rows}) == 500
    excluded = frozenset(r["prompt"] for r in rows[:100])
    assert not excluded & {r["prompt"] for r in make_rows(500, seed=7, exclude=excluded)}
    with pytest.raises(ValueError, match="n="):
        make_rows(10_001, seed=0)


# --- exact match ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("85", "85", True),
        (" 85 ", "85", True),
        ("85<eos>", "85", True),
        ("85<eos>12", "85", True),  # whatever follows EOS is not part of the answer
        ("85<pad><pad>", "85", True),
        ("085", "85", False),  # exact, not numeric, equality
        ("851", "85", False),
        ("8", "85", False),
        ("", "85", False),
        ("", "", False),  # an empty answer never matches
        ("<eos>", "85", False),
    ],
)
def test_exact_match_edge_cases(prediction, answer, expected):
    assert exact_match(prediction, answer) is expected


def test_answer_of_cuts_at_the_first_special_token():
    assert answer_of(" 12<eos>34") == "12"
    assert answer_of("<bos>7") == ""
    assert answer_of("42") == "42"
