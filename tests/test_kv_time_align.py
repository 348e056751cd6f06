"""Time alignment: resampling, segment resampling, padding, char-IoU tokenizer alignment."""

from __future__ import annotations

import pytest
import torch

from protege.kv.time_align import (
    char_alignment_matrix,
    pad_time,
    pool_teacher,
    resample_indices,
    resample_time,
    segment_resample,
)


def _brute_indices(t_src: int, t_dst: int) -> list[int]:
    if t_dst == 1:
        return [0]
    return [int(i * (t_src - 1) / (t_dst - 1) + 0.5 + 1e-9) for i in range(t_dst)]


@pytest.mark.parametrize(
    "t_src,t_dst", [(80, 50), (50, 80), (7, 7), (2, 5), (5, 2), (3, 1), (1, 4)]
)
def test_resample_indices_matches_brute_force_and_is_safe(t_src, t_dst):
    indices = resample_indices(t_src, t_dst)
    assert indices.dtype == torch.long and indices.shape == (t_dst,)
    assert indices.tolist() == _brute_indices(t_src, t_dst)
    assert int(indices.min()) >= 0 and int(indices.max()) <= t_src - 1
    assert (indices.diff() >= 0).all()
    if t_dst > 1:
        assert indices[0] == 0 and indices[-1] == t_src - 1


def test_resample_indices_edge_cases():
    assert resample_indices(7, 7).tolist() == list(range(7))
    assert resample_indices(1, 5).tolist() == [0] * 5
    assert resample_indices(0, 0).numel() == 0
    assert resample_indices(9, 0).numel() == 0
    with pytest.raises(ValueError, match="t_src=0"):
        resample_indices(0, 3)


def test_resample_time_80_to_50_gathers_within_bounds():
    x = torch.arange(80.0).view(1, 1, 80, 1).expand(4, 2, 80, 3)  # value = source index
    out = resample_time(x, 50)
    assert out.shape == (4, 2, 50, 3)
    assert out[0, 0, :, 0].long().tolist() == _brute_indices(80, 50)


def test_resample_time_t0_t1_and_masks():
    empty = torch.zeros(2, 3, 0, 4)
    assert resample_time(empty, 0).shape == (2, 3, 0, 4)
    with pytest.raises(ValueError, match="t_src=0"):
        resample_time(empty, 5)
    one = torch.randn(2, 3, 1, 4)
    assert torch.equal(resample_time(one, 6), one.expand(2, 3, 6, 4))
    mask = torch.tensor([[True, True, False, False]])
    assert resample_time(mask, 2, dim=-1).tolist() == [[True, False]]


def test_linear_resampling_matches_loop():
    x = torch.randn(2, 3, 9, 4, dtype=torch.float64)
    out = resample_time(x, 5, mode="linear")
    for i in range(5):
        p = i * 8 / 4
        lo, hi = int(p), min(int(p) + 1, 8)
        expected = x[:, :, lo] * (1 - (p - lo)) + x[:, :, hi] * (p - lo)
        torch.testing.assert_close(out[:, :, i], expected)
    torch.testing.assert_close(resample_time(x, 9, mode="linear"), x)


def test_segment_resample_keeps_boundaries():
    segment_of = torch.tensor([0] * 4 + [1] * 10 + [2] * 3, dtype=torch.float32)
    x = segment_of.view(1, 1, 17, 1)
    out = segment_resample(x, [4, 10, 3], [2, 5, 6])
    assert out.shape == (1, 1, 13, 1)
    assert out.flatten().tolist() == [0] * 2 + [1] * 5 + [2] * 6
    time_index = torch.arange(17.0).view(1, 1, 17, 1)
    pieces = segment_resample(time_index, [4, 10, 3], [2, 5, 6]).flatten().long().tolist()
    expected = [0 + i for i in _brute_indices(4, 2)]
    expected += [4 + i for i in _brute_indices(10, 5)] + [14 + i for i in _brute_indices(3, 6)]
    assert pieces == expected


def test_segment_resample_errors_name_the_problem():
    x = torch.randn(1, 1, 6, 2)
    with pytest.raises(ValueError, match="sum to 5"):
        segment_resample(x, [2, 3], [1, 1])
    with pytest.raises(ValueError, match="2 segments but dst_lengths has 3"):
        segment_resample(x, [3, 3], [1, 1, 1])
    with pytest.raises(ValueError, match="segment 1 is empty"):
        segment_resample(x, [6, 0], [3, 2])
    assert segment_resample(x, [6, 0], [3, 0]).shape == (1, 1, 3, 2)


def test_pad_time_pads_with_zeros_and_false_and_never_truncates():
    x = torch.randn(2, 3, 4, 5)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    padded, padded_mask = pad_time(x, mask, 7)
    assert padded.shape == (2, 3, 7, 5) and padded_mask.shape == (2, 7)
    assert torch.equal(padded[:, :, :4], x) and (padded[:, :, 4:] == 0).all()
    assert padded_mask.dtype == torch.bool
    assert padded_mask[:, :4].tolist() == mask.tolist() and not padded_mask[:, 4:].any()
    with pytest.raises(ValueError, match="never truncates"):
        pad_time(x, mask, 3)
    with pytest.raises(ValueError, match="mask has 3 steps"):
        pad_time(x, mask[:, :3], 7)


def _brute_alignment(student, teacher):
    rows = []
    for s0, s1 in student:
        ious = []
        for t0, t1 in teacher:
            inter = max(0, min(s1, t1) - max(s0, t0))
            union = (s1 - s0) + (t1 - t0) - inter
            ious.append(inter / union if union > 0 else 0.0)
        total = sum(ious)
        rows.append([v / total for v in ious])
    return torch.tensor(rows)


def test_char_alignment_matches_iou_definition():
    text_student = [(0, 3), (3, 5), (5, 9), (9, 10)]  # "abc|de|fghi|j"
    text_teacher = [(0, 2), (2, 5), (5, 7), (7, 10)]  # "ab|cde|fg|hij"
    align = char_alignment_matrix(text_student, text_teacher)
    assert align.shape == (4, 4)
    torch.testing.assert_close(align, _brute_alignment(text_student, text_teacher))
    torch.testing.assert_close(align.sum(-1), torch.ones(4))


def test_char_alignment_identical_tokenizations_is_identity_with_special_tokens():
    offsets = [(0, 0), (0, 2), (2, 3), (3, 7), (0, 0)]  # BOS ... EOS, as HF reports them
    torch.testing.assert_close(char_alignment_matrix(offsets, offsets), torch.eye(5))


def test_char_alignment_zero_overlap_takes_nearest_teacher_token():
    student = [(0, 2), (2, 4), (0, 0)]  # trailing EOS with a (0, 0) span
    teacher = [(0, 1), (1, 4)]
    align = char_alignment_matrix(student, teacher)
    assert align[2].tolist() == [0.0, 1.0]  # EOS sits at character 4, next to teacher token 1
    gap = char_alignment_matrix([(4, 5)], [(0, 2), (6, 9)])  # no overlap at all
    assert gap.tolist() == [[0.0, 1.0]]
    torch.testing.assert_close(align.sum(-1), torch.ones(3))


def test_char_alignment_empty_inputs():
    assert char_alignment_matrix([], [(0, 1)]).shape == (0, 1)
    assert char_alignment_matrix([(0, 1)], []).shape == (1, 0)
    assert char_alignment_matrix([], []).shape == (0, 0)


def test_char_alignment_real_tokenizer_offsets():
    from protege.tasks.tiny_models import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    encoded = tokenizer("12+34=46", return_offsets_mapping=True)
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    coarse = [(0, 2), (2, 3), (3, 5), (5, 6), (6, 8)]  # a tokenizer that merges digit pairs
    align = char_alignment_matrix(offsets, coarse)
    assert align.shape == (8, 5)
    assert align.argmax(-1).tolist() == [0, 0, 1, 2, 2, 3, 4, 4]


def test_pool_teacher_matches_loop_for_shared_and_batched_alignment():
    x_t = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    align = torch.rand(2, 6, 4, dtype=torch.float64)
    out = pool_teacher(x_t, align)
    assert out.shape == (2, 3, 6, 5)
    for b in range(2):
        for s in range(6):
            expected = sum(align[b, s, t] * x_t[b, :, t] for t in range(4))
            torch.testing.assert_close(out[b, :, s], expected)
    torch.testing.assert_close(
        pool_teacher(x_t, align[0]), pool_teacher(x_t, align[0].expand(2, 6, 4))
    )
    identity = char_alignment_matrix(
        [(0, 1), (1, 2), (2, 3), (3, 4)], [(0, 1), (1, 2), (2, 3), (3, 4)]
    )
    torch.testing.assert_close(pool_teacher(x_t, identity.double()), x_t)
    with pytest.raises(ValueError, match="T_t=4"):
        pool_teacher(x_t, torch.rand(6, 3))


def test_offsets_as_tensor_and_stacked_batches():
    from protege.kv.time_align import stack_alignments

    offsets = torch.tensor([[0, 0], [0, 2], [2, 5]])  # HF's return_tensors="pt" layout
    torch.testing.assert_close(char_alignment_matrix(offsets, offsets.tolist()), torch.eye(3))
    short = char_alignment_matrix([(0, 2)], [(0, 1), (1, 2)])
    batch = stack_alignments([torch.eye(3), short], t_student=3, t_teacher=3)
    assert batch.shape == (2, 3, 3)
    torch.testing.assert_close(batch[0], torch.eye(3))
    torch.testing.assert_close(batch[1, :1, :2], short)
    assert batch[1, 1:].abs().sum() == 0 and batch[1, :, 2:].abs().sum() == 0
    with pytest.raises(ValueError, match="alignment 0 is"):
        stack_alignments([torch.eye(4)], 3, 3)
