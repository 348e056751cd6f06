"""Training-data files: JSONL rows validated line by line (file:line in every error),
UTF-8 checked byte by byte, pre-training text lines, and the characters a tokenizer cannot
encode. `protege.data` serves them as batches.

A row is `{"prompt": str, "completion": str (optional), "answer": str (optional)}`; its other
fields are kept (privileged prompts and routing read them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from protege.errors import ProtegeError
from protege.modeling import resolve_path

OPTIONAL_TEXT_FIELDS = ("completion", "answer")


class DataError(ProtegeError):
    """Bad training data; the message names the file and line."""


@dataclass(frozen=True)
class Row:
    prompt: str
    completion: str | None = None
    answer: str | None = None
    where: str = field(default="", compare=False)  # "file:line" it was read from
    # every text field of the JSON object (privileged teachers' prompts are made from them)
    fields: dict[str, str] = field(default_factory=dict, compare=False)
    # the row's other fields, as read (e.g. the teacher a row is routed to: protege.fusion)
    extra: dict = field(default_factory=dict, compare=False, repr=False)


def read_jsonl(name: str) -> list[Row]:
    """Rows of a JSONL file, validated line by line."""
    path = _data_path(name, "data file")
    rows = [
        _parse_row(line, f"{path}:{number}") for number, line in _utf8_lines(path) if line.strip()
    ]
    if not rows:
        raise DataError(f"{path}: no rows (empty file)")
    return rows


def _parse_row(line: str, where: str) -> Row:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: malformed JSON ({error.msg})") from None
    except (ValueError, RecursionError) as error:  # a number too long, nesting too deep
        raise DataError(f"{where}: unreadable JSON ({type(error).__name__}: {error})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(record).__name__}")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise DataError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
    for key in OPTIONAL_TEXT_FIELDS:
        if key in record and not isinstance(record[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {record[key]!r}")
    texts = {key: value for key, value in record.items() if isinstance(value, str)}
    extra = {k: v for k, v in record.items() if k not in ("prompt", *OPTIONAL_TEXT_FIELDS)}
    return Row(prompt, record.get("completion"), record.get("answer"), where, texts, extra)


def read_text_lines(name: str) -> list[str]:
    path = _data_path(name, "pre-training text file")
    lines = [line.rstrip("\n") for _, line in _utf8_lines(path) if line.strip()]
    if not lines:
        raise DataError(f"{path}: the pre-training corpus is empty")
    return lines


def _data_path(name: str, what: str) -> Path:
    try:
        path = Path(resolve_path(name))
    except ProtegeError as error:  # an unknown builtin: asset
        raise DataError(str(error)) from None
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a {what}")
    if not path.is_file():
        raise DataError(f"{path}: no such {what}")
    return path


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line; a byte that is not UTF-8 is a DataError naming the
    file, line and byte offset."""
    offset = 0  # bytes before this line
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{path}:{number}: not UTF-8: byte 0x{raw[error.start]:02x} at byte offset "
                    f"{offset + error.start} (column {error.start + 1} of the line); re-encode "
                    "the file as UTF-8, e.g. "
                    f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`"
                ) from None
            yield number, text
            offset += len(raw)


def require_completions(rows: list[Row], name: str, why: str) -> None:
    for number, row in enumerate(rows, start=1):
        if row.completion is None:
            raise DataError(f"{name}: row {number} has no 'completion', which {why} needs")


@dataclass(frozen=True)
class UnknownCharacters:
    """Characters of the training text the tokenizer cannot encode: they become `<unk>` or
    vanish (some tokenizers drop what is not in their vocabulary), so the model never sees
    them. Counted at start rather than passed without a word."""

    to_unk: dict[str, int]  # character -> occurrences, encoded as the unknown token
    dropped: dict[str, int]  # character -> occurrences, encoded as nothing
    rows: int = 0  # rows holding any of them
    first: str = ""  # file:line of the first such row

    def describe(self) -> str:
        """`'é' ×3, 'ß' ×1 become <unk>; ' ' ×2 are dropped` (the commonest first)."""
        parts = []
        for counts, fate in ((self.to_unk, "become <unk>"), (self.dropped, "are dropped")):
            if counts:
                common = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
                shown = ", ".join(f"{char!r} ×{count}" for char, count in common[:8])
                more = f" and {len(common) - 8} more" if len(common) > 8 else ""
                parts.append(f"{shown}{more} {fate}")
        return "; ".join(parts)


def unknown_characters(rows: list[Row], tokenizer: PreTrainedTokenizerBase) -> UnknownCharacters:
    """The characters of the rows' prompts and completions that the tokenizer, encoding each
    on its own, turns into its unknown token or into no token at all. Special and added
    tokens written out in the text (`<eos>` ending a completion) are tokens, not characters."""
    specials = {*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()}
    pattern = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))))
    texts = [row.prompt + (row.completion or "") for row in rows]
    if specials:
        texts = [pattern.sub("", text) for text in texts]
    distinct = sorted(set().union(*map(set, texts))) if texts else []
    encoded = tokenizer(distinct, add_special_tokens=False)["input_ids"] if distinct else []
    unk = tokenizer.unk_token_id
    fate = {
        char: "dropped" if not ids else "unk"
        for char, ids in zip(distinct, encoded)
        if not ids or (unk is not None and unk in ids)
    }
    counts = {"unk": {}, "dropped": {}}
    holding = [i for i, text in enumerate(texts) if not fate.keys().isdisjoint(text)]
    for i in holding:
        for char in texts[i]:
            if char in fate:
                counts[fate[char]][char] = counts[fate[char]].get(char, 0) + 1
    first = (rows[holding[0]].where or f"row {holding[0] + 1}") if holding else ""
    return UnknownCharacters(counts["unk"], counts["dropped"], len(holding), first)
