"""`PromptSource` serves the same batches as its original, uncached algorithm.

`reference_batches` is a verbatim copy of the first implementation (reshuffle every
batch, tokenise every row every step). Resume and checkpoint tests rely on a seed
giving the same rows, padding and completions, so any optimisation must match it
bit for bit.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from protege.data import PromptSource, Row, read_jsonl, read_text_lines
from protege.modeling import load_tokenizer
from protege.records import PromptBatch
from protege.tasks import tiny

STEPS = 30


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:tiny/tokenizer")


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    """The tiny tokenizer with a chat template, so `chat_template=True` changes the prompt."""
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = (
        "{% for m in messages %}={{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %} {% endif %}"
    )
    return chat


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return read_jsonl(tiny.train_path())


@pytest.fixture(scope="module")
def pretrain() -> list[str]:
    return read_text_lines(tiny.pretrain_path())


def reference_batches(
    rows,
    tokenizer,
    batch_size,
    seed=0,
    max_prompt_tokens=256,
    pretrain=None,
    chat_template=False,
    steps=STEPS,
) -> list[dict]:
    """The original algorithm, step by step, as plain values."""

    def pad(sequences, left):
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.bool)
        for i, seq in enumerate(sequences):
            span = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[i, span] = torch.tensor(seq, dtype=torch.long)
            mask[i, span] = True
        return ids, mask

    position, batches = 0, []
    for step in range(steps):
        indices = []
        while len(indices) < batch_size:
            epoch, offset = divmod(position, len(rows))
            order = list(range(len(rows)))
            random.Random(seed * 7919 + epoch).shuffle(order)
            take = min(batch_size - len(indices), len(rows) - offset)
            indices.extend(order[offset : offset + take])
            position += take
        chosen = [rows[i] for i in indices]
        prompts = [row.prompt for row in chosen]
        if chat_template and tokenizer.chat_template:
            prompts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
                )
                for p in prompts
            ]
        encoded = tokenizer(
            prompts,
            add_special_tokens=not chat_template,
            truncation=True,
            max_length=max_prompt_tokens,
        )["input_ids"]
        batch = {"step": step, "answers": tuple(row.answer for row in chosen)}
        batch["prompt_ids"], batch["prompt_mask"] = pad(encoded, left=True)
        batch["completion_ids"] = batch["completion_mask"] = None
        if all(row.completion is not None for row in chosen):
            eos = tokenizer.eos_token_id
            encoded = tokenizer([row.completion for row in chosen], add_special_tokens=False)
            encoded = [ids if ids and ids[-1] == eos else [*ids, eos] for ids in encoded.input_ids]
            batch["completion_ids"], batch["completion_mask"] = pad(encoded, left=False)
        batch["pretrain_ids"] = batch["pretrain_mask"] = None
        if pretrain:
            rng = random.Random(seed * 104729 + step)
            texts = [pretrain[rng.randrange(len(pretrain))] for _ in range(batch_size)]
            encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
            batch["pretrain_ids"], batch["pretrain_mask"] = pad(encoded, left=False)
        batches.append(batch)
    return batches


def assert_same(got: PromptBatch, expected: dict) -> None:
    assert got.step == expected["step"]
    assert got.answers == expected["answers"]
    for name in (
        "prompt_ids",
        "prompt_mask",
        "completion_ids",
        "completion_mask",
        "pretrain_ids",
        "pretrain_mask",
    ):
        value, want = getattr(got, name), expected[name]
        if want is None:
            assert value is None, name
        else:
            assert value.dtype == want.dtype, name
            assert torch.equal(value, want), f"step {got.step}: {name} differs"


def with_some_completions_missing(rows: list[Row]) -> list[Row]:
    """Every 7th row without a completion: most batches then carry none."""
    return [
        Row(row.prompt, None if i % 7 == 0 else row.completion, row.answer)
        for i, row in enumerate(rows)
    ]


CASES = {
    # name: (rows, batch_size, seed, max_prompt_tokens, pretrain, drop completions, chat)
    "default": (slice(None), 32, 0, 256, False, False, False),
    "pretrain": (slice(None), 32, 3, 256, True, False, False),
    "epoch_boundary_mid_batch": (slice(0, 50), 32, 1, 256, True, False, False),
    "batch_larger_than_data": (slice(0, 7), 16, 2, 256, False, False, False),
    "truncated_prompts": (slice(0, 40), 8, 5, 4, False, False, False),
    "missing_completions": (slice(0, 60), 4, 0, 256, False, True, False),
    "chat_template": (slice(0, 50), 32, 7, 256, False, False, True),
}


@pytest.mark.parametrize("case", CASES)
def test_batches_match_the_original_algorithm(case, rows, tokenizer, chat_tokenizer, pretrain):
    part, batch_size, seed, max_prompt_tokens, use_pretrain, drop, chat = CASES[case]
    if chat:
        tokenizer = chat_tokenizer
    data = rows[part]
    if drop:
        data = with_some_completions_missing(data)
    corpus = pretrain if use_pretrain else None
    expected = reference_batches(
        data, tokenizer, batch_size, seed, max_prompt_tokens, corpus, chat_template=chat
    )
    source = PromptSource(
        data,
        tokenizer,
        batch_size,
        seed=seed,
        chat_template=chat,
        max_prompt_tokens=max_prompt_tokens,
        pretrain=corpus,
    )
    for step in range(STEPS):
        assert_same(source.next(step), expected[step])
    if chat:  # the template must reach the prompts
        assert (expected[0]["prompt_ids"][:, -1] == tokenizer.convert_tokens_to_ids(" ")).all()
    if drop:  # the case must exercise both kinds of batch
        kinds = {b["completion_ids"] is None for b in expected}
        assert kinds == {True, False}


def test_resume_from_state_dict_continues_the_same_sequence(rows, tokenizer, pretrain):
    data = rows[:50]
    expected = reference_batches(data, tokenizer, 32, seed=4, pretrain=pretrain)
    first = PromptSource(data, tokenizer, 32, seed=4, pretrain=pretrain)
    for step in range(13):
        first.next(step)
    state = first.state_dict()
    assert state == {"position": 13 * 32}
    resumed = PromptSource(data, tokenizer, 32, seed=4, pretrain=pretrain)
    resumed.load_state_dict(state)
    for step in range(13, STEPS):
        assert_same(resumed.next(step), expected[step])


def test_rewinding_a_used_source_replays_its_batches(rows, tokenizer):
    """Loading an earlier state into a source that has already served (and cached) rows."""
    data = rows[:50]
    expected = reference_batches(data, tokenizer, 32, seed=6)
    source = PromptSource(data, tokenizer, 32, seed=6)
    for step in range(20):
        source.next(step)
    source.load_state_dict({"position": 5 * 32})
    for step in range(5, STEPS):
        assert_same(source.next(step), expected[step])
