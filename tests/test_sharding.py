"""Shards of a step's work and their merge: rows, group ids, pre-training text, normalisers."""

from __future__ import annotations

import torch

from protege.records import PromptBatch, RolloutBatch, lm_targets
from protege.sharding import merge_shards, reduce_learner_metrics, split_prompts


def batch(rows: int, groups: list[int]) -> RolloutBatch:
    ids = torch.arange(rows * 3).view(rows, 3)
    mask = torch.ones(rows, 3, dtype=torch.bool)
    mask[0, 2] = False
    return RolloutBatch(ids, mask, ids, mask, group_ids=torch.tensor(groups))


def text(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones(rows, 5, dtype=torch.bool)
    mask[-1, 3:] = False
    return torch.arange(rows * 5).view(rows, 5), mask


def test_merge_keeps_row_order_makes_groups_distinct_and_attaches_the_text():
    ids, mask = text(3)
    prompts = PromptBatch(ids[:, :2], mask[:, :2], pretrain_ids=ids, pretrain_mask=mask)
    merged = merge_shards([batch(2, [0, 0]), batch(3, [0, 1, 1])], prompts)
    assert merged.group_ids.tolist() == [0, 0, 1, 2, 2]
    assert torch.equal(merged.pretrain_ids, ids) and torch.equal(merged.pretrain_mask, mask)


def test_shards_deal_out_text_rows_and_keep_both_global_normalisers():
    ids, mask = text(5)
    whole = batch(4, [0, 1, 2, 3]).replace(pretrain_ids=ids, pretrain_mask=mask)
    for parts in (1, 2, 3, 4):
        shards = whole.shards(parts, keep_empty=True)
        assert sum(s.size for s in shards) == 4
        assert torch.equal(torch.cat([s.pretrain_ids for s in shards]), ids)  # each row once
        assert {s.normaliser() for s in shards} == {whole.num_response_tokens}
        assert {s.pretrain_normaliser() for s in shards} == {float(lm_targets(mask).sum())}
    micro = whole.split(3)
    assert [m.size for m in micro] == [3, 1]
    assert torch.equal(torch.cat([m.pretrain_ids for m in micro]), ids)


def test_split_prompts_covers_every_row_once():
    ids = torch.arange(14).view(7, 2)
    prompts = PromptBatch(ids, torch.ones(7, 2, dtype=torch.bool), answers=tuple("abcdefg"))
    parts = split_prompts(prompts, 3)
    assert torch.equal(torch.cat([p.prompt_ids for p in parts]), ids)
    assert "".join(a for p in parts for a in p.answers) == "abcdefg"


def test_learner_metrics_add_shares_keep_shared_values_and_take_the_slowest_rank():
    ranks = [
        {"learner/loss": 0.25, "learner/lr": 0.1, "learner/seconds": 2.0, "x/y": 1.0},
        {"learner/loss": 0.5, "learner/lr": 0.1, "learner/seconds": 3.0, "x/y": 2.0},
    ]
    assert reduce_learner_metrics(ranks) == {
        "learner/loss": 0.75,
        "learner/lr": 0.1,
        "learner/seconds": 3.0,
        "x/y": 3.0,
    }
