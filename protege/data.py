"""Training data: JSONL prompt rows (with optional completions and answers) and an
optional pre-training text corpus, served as tokenised `PromptBatch`es.

Reading and validating the files is `protege.data_files`; its names are re-exported here.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase

from protege.data_files import (
    DataError,
    Row,
    UnknownCharacters,
    read_jsonl,
    read_text_lines,
    require_completions,
    unknown_characters,
)
from protege.modeling import render_chat
from protege.records import PromptBatch
from protege.teacher_prompts import TeacherPrompts

OVERLONG = ("error", "truncate_left", "drop")  # what data.overlong may say

__all__ = [
    "DataError",
    "PromptSource",
    "Row",
    "UnknownCharacters",
    "chat_template_on",
    "read_jsonl",
    "read_text_lines",
    "require_completions",
    "unknown_characters",
]


class PromptSource:
    """Shuffled, epoch-based batches of prompts (with completions and pre-training text).

    Its position is part of a checkpoint (`state_dict`), so a resumed run sees the same
    prompts in the same order. Every prompt is tokenised once, up front, so a prompt over
    `max_prompt_tokens` is met before any model loads: `overlong` says whether that is an
    error naming its file:line, or the prompt keeps its last tokens (`truncate_left`: the
    question usually ends a prompt), or the row is dropped; `truncated` and `dropped` count
    them; `unknown` counts characters the tokenizer cannot encode and `fill_duplicates` the
    repeated prompts of each batch when there are fewer rows than `batch_size`. Completion
    tokens are computed the first time a row is served and cached (the
    tokenizer must not change afterwards), and an epoch's shuffled order is computed once;
    the batches are the same as tokenising every step.
    """

    def __init__(
        self,
        rows: list[Row],
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        seed: int = 0,
        chat_template: bool = False,
        max_prompt_tokens: int = 256,
        pretrain: list[str] | None = None,
        overlong: str = "error",
        system_prompt: str | None = None,
        teacher_views: dict[str, Callable[[dict[str, str], str], str]] | None = None,
    ):
        if overlong not in OVERLONG:
            raise DataError(f"data.overlong must be one of {list(OVERLONG)}, got {overlong!r}")
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.seed, self.chat_template, self.max_prompt_tokens = (
            seed,
            chat_template,
            max_prompt_tokens,
        )
        self.pretrain, self.system_prompt = pretrain, system_prompt
        self.routes: list[int] | None = None  # per kept row, its teacher's index (fusion route)
        self.position = 0  # rows served so far, over all epochs
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its shuffled row indices)
        self.rows, prompt_ids = self._fit_prompts(rows, overlong)
        self.unknown = unknown_characters(self.rows, tokenizer)
        # A dataset smaller than a batch repeats rows in every batch (1 row, batch 32: the
        # same prompt 32 times); counted so a run says so instead of training on copies.
        self.fill_duplicates = max(batch_size - len(self.rows), 0)
        self._prompt_tokens = TokenCache(self._tokenize_prompts, len(self.rows))
        self._prompt_tokens.ids = [torch.tensor(ids, dtype=torch.long) for ids in prompt_ids]
        self._completion_tokens = TokenCache(self._tokenize_completions, len(self.rows))
        self._pretrain_tokens = TokenCache(self._tokenize_plain, len(pretrain or ()))
        self._view_ids = self._tokenize_views(teacher_views or {})

    def _tokenize_views(self, views: dict) -> dict[str, list[torch.Tensor]]:
        """teacher name -> each kept row's privileged prompt ids, rendered and tokenised like
        the student's prompt (not cut to data.max_prompt_tokens: check_positions bounds them)."""
        out = {}
        for name, text_of in views.items():
            try:
                texts = [
                    text_of(row.fields, row.where or f"row {i + 1}")
                    for i, row in enumerate(self.rows)
                ]
            except KeyError as error:
                raise DataError(error.args[0]) from None
            out[name] = [
                torch.tensor(ids, dtype=torch.long) for ids in self._tokenize_prompts(texts)
            ]
        return out

    def _fit_prompts(self, rows: list[Row], overlong: str) -> tuple[list[Row], list[list[int]]]:
        """The rows kept and their prompt ids, each at most `max_prompt_tokens` long."""
        limit = self.max_prompt_tokens
        if not rows:
            self.truncated = self.dropped = 0
            return [], []
        prompt_ids = self._tokenize_prompts([row.prompt for row in rows])
        over = [i for i, ids in enumerate(prompt_ids) if len(ids) > limit]
        self.truncated = len(over) if overlong == "truncate_left" else 0
        self.dropped = len(over) if overlong == "drop" else 0
        if over and overlong == "error":
            first = rows[over[0]]
            raise DataError(
                f"{first.where or f'row {over[0] + 1}'}: the prompt is "
                f"{len(prompt_ids[over[0]])} tokens, over data.max_prompt_tokens={limit} "
                f"({len(over)} of {len(rows)} rows are); raise data.max_prompt_tokens, or set "
                "data.overlong=truncate_left (keep each prompt's last tokens) or "
                "data.overlong=drop (skip those rows)"
            )
        if overlong == "drop":
            kept = set(range(len(rows))) - set(over)
            if not kept:
                raise DataError(
                    f"every one of the {len(rows)} prompts is over data.max_prompt_tokens="
                    f"{limit}, and data.overlong=drop dropped them all; "
                    "raise data.max_prompt_tokens"
                )
            return [rows[i] for i in sorted(kept)], [prompt_ids[i] for i in sorted(kept)]
        return list(rows), [ids[-limit:] for ids in prompt_ids]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]

    def next(self, step: int) -> PromptBatch:
        indices = self._next_indices()
        rows = [self.rows[i] for i in indices]
        pad_id = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = pad(
            self._prompt_tokens.get(indices, [row.prompt for row in rows]), pad_id, left=True
        )
        completion_ids = completion_mask = pretrain_ids = pretrain_mask = None
        if all(row.completion is not None for row in rows):
            completions = self._completion_tokens.get(indices, [row.completion for row in rows])
            completion_ids, completion_mask = pad(completions, pad_id, left=False)
        if self.pretrain:
            pretrain_ids, pretrain_mask = pad(self._pretrain_rows(step), pad_id, left=False)
        return PromptBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            answers=tuple(row.answer for row in rows),
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            pretrain_ids=pretrain_ids,
            pretrain_mask=pretrain_mask,
            step=step,
            teacher_prompts=self._teacher_prompts(indices),
            teacher_route=None
            if self.routes is None
            else torch.tensor([self.routes[i] for i in indices], dtype=torch.long),
        )

    def _teacher_prompts(self, indices: list[int]) -> TeacherPrompts | None:
        if not self._view_ids:
            return None
        pad_id = self.tokenizer.pad_token_id
        padded = {
            name: pad([ids[i] for i in indices], pad_id, left=True)
            for name, ids in self._view_ids.items()
        }
        return TeacherPrompts(
            {name: ids for name, (ids, _) in padded.items()},
            {name: mask for name, (_, mask) in padded.items()},
        )

    @property
    def longest_teacher_prompts(self) -> dict[str, int]:
        """teacher name -> tokens in its longest privileged prompt."""
        return {name: max(map(len, ids), default=0) for name, ids in self._view_ids.items()}

    def _next_indices(self) -> list[int]:
        indices = []
        while len(indices) < self.batch_size:
            epoch, offset = divmod(self.position, len(self.rows))
            order = self._epoch_order(epoch)
            take = min(self.batch_size - len(indices), len(self.rows) - offset)
            indices.extend(order[offset : offset + take])
            self.position += take
        return indices

    def _epoch_order(self, epoch: int) -> list[int]:
        """Row indices in the order epoch `epoch` serves them (a pure function of seed, epoch)."""
        if self._order[0] != epoch:
            order = list(range(len(self.rows)))
            random.Random(self.seed * 7919 + epoch).shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    @property
    def longest_prompt(self) -> int:
        """Tokens in the longest prompt served (after the template and `overlong`)."""
        return max((len(ids) for ids in self._prompt_tokens.ids), default=0)

    def format_prompt(self, prompt: str) -> str:
        if self.chat_template:
            return render_chat(self.tokenizer, prompt, self.system_prompt)
        return prompt

    def _tokenize_prompts(self, prompts: list[str]) -> list[list[int]]:
        return self.tokenizer(
            [self.format_prompt(p) for p in prompts],
            add_special_tokens=not self.chat_template,
            verbose=False,  # over-long prompts are handled by `overlong`, not warned about
        )["input_ids"]

    def _tokenize_completions(self, completions: list[str]) -> list[list[int]]:
        """Dataset responses, each ending in exactly one EOS so the student learns to stop."""
        eos = self.tokenizer.eos_token_id
        encoded = self._tokenize_plain(completions)
        return [ids if ids and ids[-1] == eos else [*ids, eos] for ids in encoded]

    def _tokenize_plain(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _pretrain_rows(self, step: int) -> list[torch.Tensor]:
        """`batch_size` pre-training lines drawn with replacement, seeded by the step."""
        rng = random.Random(self.seed * 104729 + step)
        picks = [rng.randrange(len(self.pretrain)) for _ in range(self.batch_size)]
        return self._pretrain_tokens.get(picks, [self.pretrain[i] for i in picks])


class TokenCache:
    """Token ids per item index, tokenised (in one batched call) the first time asked for."""

    def __init__(self, tokenize: Callable[[list[str]], list[list[int]]], size: int):
        self.tokenize = tokenize
        self.ids: list[torch.Tensor | None] = [None] * size  # [L] long per item

    def get(self, indices: list[int], texts: list[str]) -> list[torch.Tensor]:
        """The ids of items `indices`, whose texts are `texts` (read only for new items)."""
        missing = {i: text for i, text in zip(indices, texts) if self.ids[i] is None}
        if missing:
            for i, ids in zip(missing, self.tokenize(list(missing.values()))):
                self.ids[i] = torch.tensor(ids, dtype=torch.long)
        return [self.ids[i] for i in indices]


def pad(
    sequences: list[torch.Tensor], pad_id: int, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad [L_i] long id tensors into ([B,L] long ids, [B,L] bool mask)."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)  # [B]
    width = int(lengths.max())
    columns = torch.arange(width)  # [L]
    if left:
        mask = columns >= width - lengths[:, None]
    else:
        mask = columns < lengths[:, None]
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    ids[mask] = torch.cat(sequences)  # row-major fill: each row's tokens land in its span
    return ids, mask


def chat_template_on(data, tokenizer: PreTrainedTokenizerBase, model: str) -> bool:
    """Whether prompts are wrapped in the chat template (`data.chat_template`; auto: when
    the student's tokenizer has one), or a DataError naming the key and the fix."""
    has = bool(getattr(tokenizer, "chat_template", None))
    setting = data.chat_template
    if setting is True and not has:
        raise DataError(
            f"data.chat_template=on, but the tokenizer of {model} has no chat template; "
            "set data.chat_template=off (or auto), or use a tokenizer that has one"
        )
    on = has if setting == "auto" else bool(setting)
    if data.system_prompt is not None and not on:
        raise DataError(
            "data.system_prompt is set but prompts are not wrapped in a chat template "
            f"(data.chat_template={setting}, tokenizer {'has' if has else 'has no'} template); "
            "set data.chat_template=on with a chat tokenizer, or unset data.system_prompt"
        )
    return on
