"""Cutting a step's work into per-worker shards and putting the results back together."""

from __future__ import annotations

import torch

from protege.memory import PEAK_SUFFIX
from protege.records import PromptBatch, RolloutBatch, TokenSource, concat, row_chunks


def split_prompts(prompts: PromptBatch, parts: int) -> list[PromptBatch]:
    """Contiguous row shards of the prompts (pre-training text stays with the controller)."""
    shards = []
    for rows in row_chunks(prompts.size, parts):
        completions = prompts.completion_ids is not None and prompts.completion_mask is not None
        shards.append(
            PromptBatch(
                prompt_ids=prompts.prompt_ids[rows],
                prompt_mask=prompts.prompt_mask[rows],
                answers=prompts.answers[rows],
                completion_ids=prompts.completion_ids[rows] if completions else None,
                completion_mask=prompts.completion_mask[rows] if completions else None,
                step=prompts.step,
                teacher_prompts=prompts.teacher_prompts and prompts.teacher_prompts.select(rows),
            )
        )
    return shards


def merge_shards(shards: list[RolloutBatch], prompts: PromptBatch) -> RolloutBatch:
    """One batch from a step's shards, in order, with the step's pre-training text attached
    (the one place it joins the batch) and group ids made distinct across shards."""
    batch = concat(_distinct_groups(shards))
    return batch.replace(
        pretrain_ids=prompts.pretrain_ids,
        pretrain_mask=prompts.pretrain_mask,
        teacher_route=_row_routes(prompts, batch.size),
    )


def _row_routes(prompts: PromptBatch, rows: int):
    """Each response row's teacher index (fusion.mode=route): its prompt's, the samples of a
    prompt being consecutive rows."""
    if prompts.teacher_route is None or prompts.size == 0:
        return None
    if rows % prompts.size:
        raise ValueError(f"{rows} response rows for {prompts.size} prompts")
    return prompts.teacher_route.repeat_interleave(rows // prompts.size)


def _distinct_groups(shards: list[RolloutBatch]) -> list[RolloutBatch]:
    """Offset each shard's group ids so samples of different prompts never share one."""
    offset, renumbered = 0, []
    for shard in shards:
        if shard.group_ids is None or shard.size == 0:
            renumbered.append(shard)
            continue
        renumbered.append(shard.replace(group_ids=shard.group_ids + offset))
        offset += int(shard.group_ids.max()) + 1
    return renumbered


def dataset_batch(prompts: PromptBatch, version: int) -> RolloutBatch:
    """The dataset's own responses as a batch (GKD's off-policy branch, SFT, KV
    distillation's teacher-forced sequences)."""
    if prompts.completion_ids is None:
        raise ValueError("this step trains on dataset responses, but the rows have no 'completion'")
    source = torch.full_like(prompts.completion_ids, int(TokenSource.DATASET), dtype=torch.int8)
    return RolloutBatch(
        prompt_ids=prompts.prompt_ids,
        prompt_mask=prompts.prompt_mask,
        response_ids=prompts.completion_ids,
        response_mask=prompts.completion_mask,
        token_source=source,
        answers=prompts.answers,
        group_ids=torch.arange(prompts.size),
        step=prompts.step,
        weights_version=version,
        teacher_prompts=prompts.teacher_prompts,
    )


# Learner metrics that every rank reports identically (the rest are shares of a global
# normaliser and add up across ranks).
SHARED_LEARNER_METRICS = frozenset(
    {
        "learner/lr",
        "learner/grad_norm",
        "learner/skipped",
        "learner/version",
        "learner/nonfinite",
        "learner/empty_batch",
        "learner/nonfinite_weights",  # reduced over ranks inside the learner
        "router/updated",  # fusion.mode=learned: one decision for every rank
        "router/batch_entropy",  # fusion.mode=learned: of the whole batch's mean α
    }
)
LEARNER_SECONDS = "learner/seconds"


def reduce_learner_metrics(results: list[dict[str, float]]) -> dict[str, float]:
    """One metrics dict from every data-parallel rank's: shares summed, shared values kept,
    seconds the slowest rank's (ranks step in parallel)."""
    total: dict[str, float] = dict(results[0])
    for metrics in results[1:]:
        for key, value in metrics.items():
            if key == LEARNER_SECONDS or key.endswith(PEAK_SUFFIX):
                total[key] = max(total.get(key, 0.0), value)
            elif key not in SHARED_LEARNER_METRICS:
                total[key] = total.get(key, 0.0) + value
    return total
