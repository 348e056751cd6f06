"""`PromptSource`'s contract: each epoch serves every row once in a seeded order, a resumed
source continues the same sequence, prompts are left-padded and completions right-padded
ending in exactly one EOS. Rows are identified by their token ids (the tiny rows' prompts
are distinct), never by the source's internals."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from protege.data import DataError, PromptSource, Row, read_jsonl, read_text_lines
from protege.modeling import load_tokenizer
from protege.records import PromptBatch
from protege.tasks import tiny

BATCH_FIELDS = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "pretrain_ids",
    "pretrain_mask",
)


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


def tokens(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def real(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each row's unpadded ids."""
    return [row[keep].tolist() for row, keep in zip(ids, mask)]


def served_rows(batch: PromptBatch, data: list[Row], tokenizer) -> list[int]:
    """Indices into `data` of the rows `batch` holds, in order (found by their prompt ids)."""
    index = {tuple(tokens(tokenizer, row.prompt)): i for i, row in enumerate(data)}
    assert len(index) == len(data), "the test rows' prompts must be distinct"
    served = [index[tuple(ids)] for ids in real(batch.prompt_ids, batch.prompt_mask)]
    assert batch.answers == tuple(data[i].answer for i in served)  # answers travel with rows
    return served


def serve(source: PromptSource, steps: range) -> list[PromptBatch]:
    return [source.next(step) for step in steps]


def assert_same_batches(got: list[PromptBatch], expected: list[PromptBatch]) -> None:
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected):
        assert mine.step == theirs.step and mine.answers == theirs.answers
        for name in BATCH_FIELDS:
            a, b = getattr(mine, name), getattr(theirs, name)
            assert (a is None) == (b is None), name
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b), f"step {mine.step}: {name}"


def epochs_of(sequence: list[int], size: int) -> list[list[int]]:
    return [sequence[start : start + size] for start in range(0, len(sequence), size)]


@pytest.mark.parametrize("num_rows,batch_size", [(50, 10), (50, 32), (7, 16)])
def test_every_epoch_serves_every_row_exactly_once(rows, tokenizer, num_rows, batch_size):
    """Also when a batch straddles an epoch boundary, or is larger than the data (7 rows,
    16 per batch: one batch holds two whole epochs and the start of a third)."""
    data = rows[:num_rows]
    source = PromptSource(data, tokenizer, batch_size, seed=1)
    batches = serve(source, range(12))
    assert all(batch.size == batch_size for batch in batches)
    assert [batch.step for batch in batches] == list(range(12))
    sequence = [i for batch in batches for i in served_rows(batch, data, tokenizer)]
    epochs = epochs_of(sequence, num_rows)
    for epoch in epochs[:-1]:
        assert sorted(epoch) == list(range(num_rows))
    assert len(set(epochs[-1])) == len(epochs[-1])  # the unfinished epoch repeats no row
    assert len(epochs) >= 3
    assert epochs[0] != epochs[1]  # each epoch is reshuffled
    assert epochs[0] != sorted(epochs[0])  # and shuffled at all


def test_the_order_is_a_function_of_the_seed(rows, tokenizer, pretrain):
    data = rows[:50]

    def batches(seed: int) -> list[PromptBatch]:
        return serve(PromptSource(data, tokenizer, 16, seed=seed, pretrain=pretrain), range(8))

    first = batches(seed=3)
    assert_same_batches(batches(seed=3), first)
    other = batches(seed=4)
    assert [served_rows(b, data, tokenizer) for b in other] != [
        served_rows(b, data, tokenizer) for b in first
    ]
    assert any(not torch.equal(a.pretrain_ids, b.pretrain_ids) for a, b in zip(first, other))


def test_a_resumed_source_continues_the_uninterrupted_sequence(rows, tokenizer, pretrain):
    data = rows[:50]
    uninterrupted = PromptSource(data, tokenizer, 32, seed=4, pretrain=pretrain)
    serve(uninterrupted, range(13))
    state = uninterrupted.state_dict()
    expected = serve(uninterrupted, range(13, 30))

    resumed = PromptSource(data, tokenizer, 32, seed=4, pretrain=pretrain)
    resumed.load_state_dict(copy.deepcopy(state))
    assert_same_batches(serve(resumed, range(13, 30)), expected)


def test_rewinding_a_used_source_replays_its_batches(rows, tokenizer):
    """Loading an earlier state into a source that has already served rows past it."""
    source = PromptSource(rows[:50], tokenizer, 32, seed=6)
    serve(source, range(5))
    state = source.state_dict()
    expected = serve(source, range(5, 20))
    serve(source, range(20, 25))
    source.load_state_dict(state)
    assert_same_batches(serve(source, range(5, 20)), expected)


@pytest.mark.parametrize("max_prompt_tokens", [256, 4])
def test_prompts_are_left_padded_and_truncated_on_the_left(rows, tokenizer, max_prompt_tokens):
    data = rows[:40]
    source = PromptSource(
        data, tokenizer, 8, seed=5, max_prompt_tokens=max_prompt_tokens, overlong="truncate_left"
    )
    batch = source.next(0)
    full = {tuple(tokens(tokenizer, row.prompt)): row for row in data}
    ids, mask = batch.prompt_ids, batch.prompt_mask
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
    lengths = mask.sum(-1)
    assert mask[:, -1].all() and int(lengths.max()) == ids.shape[1]  # no all-pad column
    for row_ids, row_mask, length in zip(ids, mask, lengths.tolist()):
        assert row_mask[-length:].all() and not row_mask[:-length].any()  # pads on the left
        assert (row_ids[~row_mask] == tokenizer.pad_token_id).all()
    kept = real(ids, mask)
    if max_prompt_tokens == 256:
        assert len(set(lengths.tolist())) > 1  # the batch exercises the padding
        assert all(tuple(prompt) in full for prompt in kept)
    else:
        assert max(len(prompt) for prompt in kept) == 4
        suffixes = {key[-4:] for key in full}  # the question's end is kept
        assert all(tuple(prompt) in suffixes for prompt in kept)
        assert source.truncated == sum(len(key) > 4 for key in full) > 0
        assert source.dropped == 0


def test_an_overlong_prompt_is_an_error_naming_its_line(tmp_path, tokenizer):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1="}\n\n{"prompt": "' + "12345+" * 20 + '1="}\n')
    with pytest.raises(DataError) as error:
        PromptSource(read_jsonl(str(data)), tokenizer, 2, max_prompt_tokens=16)
    message = str(error.value)
    assert f"{data}:3: the prompt is" in message and "data.max_prompt_tokens=16" in message
    assert "data.overlong=truncate_left" in message and "data.overlong=drop" in message
    assert str(len(tokens(tokenizer, "12345+" * 20 + "1="))) in message


def test_overlong_prompts_can_be_dropped(tmp_path, tokenizer):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1="}\n{"prompt": "' + "9" * 40 + '"}\n{"prompt": "2+2="}\n')
    source = PromptSource(
        read_jsonl(str(data)), tokenizer, 2, max_prompt_tokens=16, overlong="drop"
    )
    assert [row.prompt for row in source.rows] == ["1+1=", "2+2="]
    assert (source.dropped, source.truncated) == (1, 0)
    assert int(source.next(0).prompt_mask.sum(-1).max()) <= 16
    with pytest.raises(DataError, match="dropped them all"):
        PromptSource(source.rows, tokenizer, 2, max_prompt_tokens=1, overlong="drop")


def test_a_byte_that_is_not_utf8_names_file_line_and_offset(tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"prompt": "1+1="}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError) as error:
        read_jsonl(str(data))
    assert f"{data}:2: not UTF-8: byte 0xe9 at byte offset 34" in str(error.value)
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"fine\n\xff\n")
    with pytest.raises(DataError, match=r"corpus.txt:2: not UTF-8: byte 0xff at byte offset 5"):
        read_text_lines(str(corpus))


def test_completions_end_in_exactly_one_eos(rows, tokenizer):
    """Whether or not the completion text already ends with the EOS token."""
    eos = tokenizer.eos_token_id
    with_eos = rows[:10]
    assert all(row.completion.endswith(tokenizer.eos_token) for row in with_eos)
    without_eos = [
        Row(row.prompt, row.completion.removesuffix(tokenizer.eos_token), row.answer)
        for row in rows[10:20]
    ]
    data = with_eos + without_eos
    batch = PromptSource(data, tokenizer, len(data), seed=0).next(0)
    ids, mask = batch.completion_ids, batch.completion_mask
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
    lengths = mask.sum(-1)
    assert int(lengths.max()) == ids.shape[1]
    for served, row_ids, row_mask, length in zip(
        served_rows(batch, data, tokenizer), ids, mask, lengths.tolist()
    ):
        assert row_mask[:length].all() and not row_mask[length:].any()  # pads on the right
        assert (row_ids[~row_mask] == tokenizer.pad_token_id).all()
        completion = row_ids[row_mask].tolist()
        text = data[served].completion.removesuffix(tokenizer.eos_token)
        assert completion == [*tokens(tokenizer, text, special=False), eos]


def test_a_batch_with_a_row_missing_its_completion_carries_none(rows, tokenizer):
    data = [
        Row(row.prompt, None if i % 7 == 0 else row.completion, row.answer)
        for i, row in enumerate(rows[:60])
    ]
    source = PromptSource(data, tokenizer, 4, seed=0)
    kinds = set()
    for step in range(30):
        batch = source.next(step)
        complete = all(data[i].completion is not None for i in served_rows(batch, data, tokenizer))
        assert (batch.completion_ids is not None) == complete
        assert (batch.completion_mask is not None) == complete
        kinds.add(complete)
    assert kinds == {True, False}  # both kinds of batch occurred


def test_pretraining_text_is_drawn_per_step_from_the_corpus(rows, tokenizer, pretrain):
    source = PromptSource(rows[:20], tokenizer, 6, seed=2, pretrain=pretrain)
    corpus = {tuple(tokens(tokenizer, line, special=False)) for line in pretrain}
    batches = serve(source, range(4))
    for batch in batches:
        ids, mask = batch.pretrain_ids, batch.pretrain_mask
        assert ids.shape[0] == 6 and mask.dtype == torch.bool
        for length, row_mask in zip(mask.sum(-1).tolist(), mask):
            assert row_mask[:length].all() and not row_mask[length:].any()
        assert all(tuple(line) in corpus for line in real(ids, mask))
    assert any(
        not torch.equal(a.pretrain_ids, b.pretrain_ids) for a, b in itertools.pairwise(batches)
    )
    assert PromptSource(rows[:20], tokenizer, 6).next(0).pretrain_ids is None


def test_the_chat_template_reaches_the_prompts(rows, chat_tokenizer):
    data = rows[:20]
    batch = PromptSource(data, chat_tokenizer, 8, seed=7, chat_template=True).next(0)
    templated = {
        tuple(tokens(chat_tokenizer, f"={row.prompt} ", special=False)): row.answer for row in data
    }
    prompts = real(batch.prompt_ids, batch.prompt_mask)
    assert [templated[tuple(ids)] for ids in prompts] == list(batch.answers)
    plain = PromptSource(data, chat_tokenizer, 8, seed=7, chat_template=False).next(0)
    assert [ids[1:-1] for ids in prompts] == real(plain.prompt_ids, plain.prompt_mask)


def test_a_system_prompt_is_a_system_turn_before_each_prompt(rows, chat_tokenizer):
    data = rows[:4]
    batch = PromptSource(data, chat_tokenizer, 4, chat_template=True, system_prompt="9").next(0)
    expected = {tuple(tokens(chat_tokenizer, f"=9={row.prompt} ", special=False)) for row in data}
    assert {tuple(ids) for ids in real(batch.prompt_ids, batch.prompt_mask)} == expected


@pytest.mark.parametrize(
    ("setting", "system", "has_template", "outcome"),
    [
        ("auto", None, True, True),
        ("auto", None, False, False),
        (False, None, True, False),
        (True, None, True, True),
        (True, None, False, "has no chat template; set data.chat_template=off"),
        ("auto", "be brief", False, "data.system_prompt is set but prompts are not wrapped"),
        (False, "be brief", True, "data.system_prompt is set but prompts are not wrapped"),
    ],
)
def test_chat_template_setting(setting, system, has_template, outcome, tokenizer, chat_tokenizer):
    from protege.config import DataConfig
    from protege.data import chat_template_on

    data = DataConfig(chat_template=setting, system_prompt=system)
    chosen = chat_tokenizer if has_template else tokenizer
    if isinstance(outcome, str):
        with pytest.raises(DataError, match=outcome):
            chat_template_on(data, chosen, "m")
    else:
        assert chat_template_on(data, chosen, "m") is outcome


def test_a_teacher_whose_chat_template_renders_otherwise_is_refused(tokenizer, chat_tokenizer):
    from protege.errors import SetupError
    from protege.modeling import check_same_chat_template

    other = copy.deepcopy(chat_tokenizer)
    other.chat_template = chat_tokenizer.chat_template.replace("=", "#")
    check_same_chat_template(chat_tokenizer, copy.deepcopy(chat_tokenizer), "t", None)
    check_same_chat_template(chat_tokenizer, tokenizer, "t", None)  # a base teacher: no format
    with pytest.raises(SetupError, match="teacher 't' and the student render the chat template"):
        check_same_chat_template(chat_tokenizer, other, "t", None)


def test_characters_the_tokenizer_cannot_encode_are_counted(tokenizer):
    """Checked against each character's own encoding: the built-in student's tokenizer (a
    Qwen2Tokenizer over the char vocabulary) drops what it cannot encode; the same vocabulary
    through the plain tokenizers backend turns it into <unk>."""
    from transformers import AutoTokenizer

    from protege.data import unknown_characters
    from protege.modeling import resolve_path

    rows = [
        Row("1+é=", "2ßß<eos>", where="t:1"),
        Row("1+1=", "2<eos>", where="t:2"),  # a special token written out is not characters
        Row("ß=", where="t:3"),
    ]
    dropped = unknown_characters(rows, tokenizer)
    for char in "éß":
        assert tokens(tokenizer, char, special=False) in ([], [tokenizer.unk_token_id])
    found = {**dropped.to_unk, **dropped.dropped}
    assert found == {"é": 1, "ß": 3} and (dropped.rows, dropped.first) == (2, "t:1")
    plain = AutoTokenizer.from_pretrained(resolve_path("builtin:tiny/tokenizer"))
    assert plain("é", add_special_tokens=False)["input_ids"] == [plain.unk_token_id]
    unk = unknown_characters(rows, plain)
    assert unk.to_unk == {"é": 1, "ß": 3} and unk.dropped == {}
    assert "'ß' ×3, 'é' ×1 become <unk>" in unk.describe()
    clean = unknown_characters(rows[1:2], plain)
    assert (clean.rows, clean.to_unk, clean.dropped) == (0, {}, {})


@pytest.mark.parametrize("num_rows,batch_size,duplicates", [(1, 8, 7), (3, 8, 5), (8, 8, 0)])
def test_a_dataset_smaller_than_a_batch_counts_its_repeats(
    rows, tokenizer, num_rows, batch_size, duplicates
):
    source = PromptSource(rows[:num_rows], tokenizer, batch_size)
    assert source.fill_duplicates == duplicates
    served = served_rows(source.next(0), rows[:num_rows], tokenizer)
    assert len(served) - len(set(served)) == duplicates  # the batch really repeats that many


def test_the_run_reports_unknown_characters_and_repeats_at_start(tmp_path, tokenizer):
    from protege.config import load_config
    from protege.run import data_summary

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1="}\n{"prompt": "2+é="}\n')
    config = load_config("gkd", [f"data.train={data}", "trainer.batch_size=4"])
    source = PromptSource(read_jsonl(str(data)), tokenizer, 4)
    first, unknown, repeats = data_summary(config, source)
    assert "1 with characters the tokenizer cannot encode; 2 repeated prompts per batch" in first
    assert f"the first at {data}:2" in unknown and "'é' ×1" in unknown
    assert "2 of its 4 prompts are duplicates" in repeats and "trainer.batch_size" in repeats
