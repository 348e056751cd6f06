"""RolloutBatch: select/split/concat keep every per-row field aligned with its row."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from protege.records import _PER_ROW_TENSORS, RolloutBatch, TokenSource, concat

K, V = 3, 5


ROW_FIELDS = sorted(_PER_ROW_TENSORS - {"prompt_mask", "response_mask", "token_source"})


def labelled_batch(
    rows: int, prompt_len: int, response_len: int, first_label: int = 0
) -> RolloutBatch:
    """Every per-row field of row i holds the label first_label + i + 1 on its real positions
    (so a misaligned row shows, and 0 is left for padding)."""
    labels = torch.arange(first_label, first_label + rows) + 1
    lengths = (labels % response_len) + 1
    shapes = {
        "prompt_ids": (prompt_len,),
        "teacher_topk_ids": (response_len, K),
        "teacher_topk_logprobs": (response_len, K),
        "teacher_logits": (response_len, V),
        "rewards": (),
        "group_ids": (),
        "teacher_route": (),
    }
    fields = {}
    for name in ROW_FIELDS:
        shape = shapes.get(name, (response_len,))
        dtype = torch.long if name.endswith("_ids") else torch.float32
        fields[name] = labels.view(-1, *[1] * len(shape)).expand(rows, *shape).to(dtype).clone()
    return RolloutBatch(
        prompt_mask=torch.ones(rows, prompt_len, dtype=torch.bool),
        response_mask=torch.arange(response_len) < lengths.unsqueeze(-1),
        token_source=torch.full((rows, response_len), int(TokenSource.TEACHER), dtype=torch.int8),
        answers=tuple(f"answer-{int(i)}" for i in labels),
        pretrain_ids=torch.ones(2, 4, dtype=torch.long),
        pretrain_mask=torch.ones(2, 4, dtype=torch.bool),
        step=7,
        weights_version=3,
        extras={"rollout/x": 1.0},
        **fields,
    )


def row_label(batch: RolloutBatch, row: int) -> int:
    """The label of `row`, checked to agree across every per-row field's real positions."""
    label = int(batch.rewards[row])
    assert batch.answers[row] == f"answer-{label}"
    for name in ROW_FIELDS:
        value = getattr(batch, name)[row]
        if name.startswith("prompt"):
            value = value[batch.prompt_mask[row]]
        elif value.dim() > 0:
            value = value[batch.response_mask[row]]
        assert value.numel() > 0 and value.eq(label).all(), name
    return label


def test_every_row_field_is_sliced_by_select():
    assert set(_PER_ROW_TENSORS) == {
        f.name
        for f in dataclasses.fields(RolloutBatch)
        if f.name
        not in (
            "answers",
            "pretrain_ids",
            "pretrain_mask",
            "token_count",
            "pretrain_token_count",
            "step",
            "weights_version",
            "extras",
            "teacher_kv",  # per-row LayerKVs, selected on their own (tests/test_kv_distill.py)
            "teacher_prompts",  # per-teacher prompts, selected on their own (test_privileged.py)
            "named_teachers",  # per-teacher payloads, selected on their own (tests/test_fusion.py)
        )
    }


@pytest.mark.parametrize(
    "rows,expected",
    [
        ([4, 0, 2], [4, 0, 2]),
        (slice(1, 5, 2), [1, 3]),
        (torch.tensor([5, 1]), [5, 1]),
        (torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool), [0, 2, 5]),  # a row mask
    ],
)
def test_select_keeps_rows_aligned(rows, expected):
    batch = labelled_batch(6, 3, 4)
    picked = batch.select(rows)
    assert picked.size == len(expected)
    assert [row_label(picked, i) - 1 for i in range(picked.size)] == expected
    assert picked.step == 7 and picked.weights_version == 3 and picked.extras == batch.extras
    assert torch.equal(picked.pretrain_ids, batch.pretrain_ids)  # pre-training text is kept


def test_split_keeps_rows_and_the_global_token_count():
    batch = labelled_batch(7, 3, 4)
    for size in (1, 3, 7, 10):
        parts = batch.split(size)
        assert [p.size for p in parts] == [min(size, 7 - s) for s in range(0, 7, size)]
        labels = [row_label(p, i) for p in parts for i in range(p.size)]
        assert labels == list(range(1, 8))
        assert all(p.token_count == batch.num_response_tokens for p in parts)
        assert all(p.normaliser() == batch.normaliser() for p in parts)
        assert sum(p.num_response_tokens for p in parts) == batch.num_response_tokens
    already_global = batch.replace(token_count=100.0)
    assert all(p.token_count == 100.0 for p in already_global.split(2))
    with pytest.raises(ValueError, match="micro_batch_size"):
        batch.split(0)


def test_normaliser_defaults_to_this_batch_tokens():
    batch = labelled_batch(4, 2, 3)
    assert batch.normaliser() == float(batch.response_mask.sum())
    assert batch.replace(token_count=50.0).normaliser() == 50.0


def test_concat_pads_prompts_left_and_responses_right():
    short = labelled_batch(2, prompt_len=2, response_len=3, first_label=0)
    long = labelled_batch(3, prompt_len=5, response_len=6, first_label=2)
    joined = concat([short, long.replace(extras={"rollout/y": 2.0})])
    assert joined.size == 5
    assert joined.prompt_ids.shape == (5, 5) and joined.response_ids.shape == (5, 6)
    assert joined.teacher_topk_ids.shape == (5, 6, K) and joined.teacher_logits.shape == (5, 6, V)
    assert joined.rewards.shape == (5,)
    # prompts: left padding, real tokens flush right
    assert joined.prompt_mask[:2].tolist() == [[False, False, False, True, True]] * 2
    assert joined.prompt_ids[:2, :3].eq(0).all()
    assert torch.equal(joined.prompt_ids[:2, 3:], short.prompt_ids)
    # responses: right padding, real tokens flush left, padding never marked real
    assert joined.response_mask[:2, 3:].eq(False).all()
    assert torch.equal(joined.response_ids[:2, :3], short.response_ids)
    assert torch.equal(joined.response_mask[2:], long.response_mask)
    assert [row_label(joined, i) for i in range(5)] == [1, 2, 3, 4, 5]
    assert joined.token_count is None
    assert joined.extras == {"rollout/x": 1.0, "rollout/y": 2.0}
    assert joined.num_response_tokens == short.num_response_tokens + long.num_response_tokens


def test_concat_inverts_split():
    batch = labelled_batch(5, 3, 4)
    rejoined = concat(batch.split(2))
    for name in _PER_ROW_TENSORS:
        assert torch.equal(getattr(rejoined, name), getattr(batch, name)), name
    assert rejoined.answers == batch.answers and rejoined.token_count is None


def test_concat_refuses_a_field_only_some_batches_have():
    batch = labelled_batch(2, 2, 3)
    with pytest.raises(ValueError, match="teacher_logits"):
        concat([batch, batch.replace(teacher_logits=None)])


def test_replace_returns_a_new_batch():
    batch = labelled_batch(2, 2, 3)
    changed = batch.replace(step=9)
    assert changed.step == 9 and batch.step == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.step = 1


def test_concat_combines_shard_extras_by_rows_or_sums():
    """Several rollout workers' metrics: means weighted by rows, totals (seconds, counts) summed."""
    two = labelled_batch(2, 2, 3).replace(
        extras={
            "rollout/response_length": 3.0,
            "rollout/seconds": 0.5,
            "rollout/rewritten_steps": 1.0,
        }
    )
    six = labelled_batch(6, 2, 3).replace(
        extras={
            "rollout/response_length": 7.0,
            "rollout/seconds": 0.25,
            "rollout/rewritten_steps": 4.0,
        }
    )
    joined = concat([two, six])
    assert joined.extras["rollout/response_length"] == pytest.approx((2 * 3.0 + 6 * 7.0) / 8)
    assert joined.extras["rollout/seconds"] == pytest.approx(0.75)
    assert joined.extras["rollout/rewritten_steps"] == pytest.approx(5.0)


def test_records_pickle_through_one_buffer_and_come_back_equal():
    import pickle

    from protege.records import WeightUpdate

    batch = labelled_batch(3, 2, 4).replace(token_count=9.0, rewards=torch.tensor([1.0, 2.0, 3.0]))
    batch = batch.replace(teacher_logits=batch.teacher_logits.to(torch.bfloat16))
    back = pickle.loads(pickle.dumps(batch, protocol=5))
    for f in dataclasses.fields(batch):
        mine, theirs = getattr(batch, f.name), getattr(back, f.name)
        if isinstance(mine, torch.Tensor):
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), f.name
        else:
            assert mine == theirs, f.name
    back.response_ids[0, 0] = 99  # a private, writable copy
    assert batch.response_ids[0, 0] != 99
    update = WeightUpdate(
        3, {"w": torch.randn(3, 5), "b": torch.zeros(()), "e": torch.ones(0, 2)}, True
    )
    again = pickle.loads(pickle.dumps(update, protocol=5))
    assert again.version == 3 and again.lora_only
    assert all(torch.equal(update.tensors[k], again.tensors[k]) for k in update.tensors)


def test_a_weight_update_pickles_each_tensor_out_of_band_without_a_copy():
    """Ray writes out-of-band buffers straight into its object store: the update must hand
    over the weights' own bytes (a packed copy was the Ray learner's memory peak)."""
    import pickle

    import numpy as np

    from protege.records import WeightUpdate

    embedding = torch.randn(64, 32)
    weights = {"embed": embedding, "h": torch.randn(8).to(torch.bfloat16), "s": torch.ones(())}
    weights["lm_head"] = embedding  # a head tied to the embedding: sent once
    buffers = []
    data = pickle.dumps(WeightUpdate(4, weights), protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 3 and len(data) < 1024
    for buffer, tensor in zip(buffers, list(weights.values())[:3]):
        view = np.frombuffer(buffer.raw(), dtype=np.uint8)
        assert np.shares_memory(view, tensor.view(-1).view(torch.uint8).numpy())
    back = pickle.loads(data, buffers=[b.raw() for b in buffers])
    for name, tensor in weights.items():
        assert torch.equal(back.tensors[name], tensor) and back.tensors[name].dtype == tensor.dtype
    assert back.tensors["lm_head"] is back.tensors["embed"]


def test_shards_combine_peak_memory_by_maximum_and_seconds_by_sum():
    def shard(rows: int, peak: float) -> RolloutBatch:
        ids = torch.zeros(rows, 2, dtype=torch.long)
        mask = torch.ones(rows, 2, dtype=torch.bool)
        extras = {"memory/rollout_peak_gib": peak, "rollout/seconds": 1.0}
        return RolloutBatch(ids, mask, ids, mask, extras=extras)

    merged = concat([shard(2, 1.5), shard(3, 2.5)])
    assert merged.extras == {"memory/rollout_peak_gib": 2.5, "rollout/seconds": 2.0}


def test_every_role_reports_its_peak_memory_in_a_run(tmp_path):
    from protege.config import load_config
    from protege.run import build_controller

    argv = ["trainer.workers=local", "trainer.steps=1", "trainer.batch_size=4", "data.test=null"]
    argv += ["logging.wandb=disabled", "logging.progress=false", f"output_dir={tmp_path}"]
    rows = []
    build_controller(load_config("rl_distill", argv)).run(on_step=lambda k, row: rows.append(row))
    for role in ("rollout", "teacher", "learner", "reward", "driver"):
        assert 0.05 < rows[0][f"memory/{role}_peak_gib"] < 64
