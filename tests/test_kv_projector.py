"""Head/head-dim projection of teacher K/V, including the seed's shape-bug cases."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from protege.kv.projector import KVProjector, head_mixing_init, kv_heads_and_dim
from protege.kv.time_align import resample_time


def _brute_mixing(teacher_heads: int, student_heads: int) -> torch.Tensor:
    """Overlap of [s·H_t/H_s, (s+1)·H_t/H_s) with [t, t+1), divided by the slice width."""
    width = Fraction(teacher_heads, student_heads)
    rows = []
    for s in range(student_heads):
        lo, hi = s * width, (s + 1) * width
        rows.append(
            [float(max(0, min(hi, t + 1) - max(lo, t)) / width) for t in range(teacher_heads)]
        )
    return torch.tensor(rows)


@pytest.mark.parametrize(
    "teacher_heads,student_heads", [(12, 2), (28, 4), (5, 2), (7, 3), (2, 4), (2, 3), (4, 4)]
)
def test_head_mixing_init_is_grouped_overlap_average(teacher_heads, student_heads):
    weights = head_mixing_init(teacher_heads, student_heads)
    assert weights.shape == (student_heads, teacher_heads)
    torch.testing.assert_close(weights, _brute_mixing(teacher_heads, student_heads))
    torch.testing.assert_close(weights.sum(1), torch.ones(student_heads))


def test_head_mixing_examples():
    assert head_mixing_init(4, 4).tolist() == torch.eye(4).tolist()
    assert head_mixing_init(2, 4).tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]]  # replicate
    torch.testing.assert_close(
        head_mixing_init(3, 2), torch.tensor([[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]])
    )
    with pytest.raises(ValueError, match="student_heads=0"):
        head_mixing_init(4, 0)


def test_seed_case_12_to_2_heads_is_mean_of_head_groups():
    x = torch.randn(4, 12, 50, 128)
    out = KVProjector(12, 128, 2, 128)(x)
    assert out.shape == (4, 2, 50, 128)
    expected = torch.stack([x[:, :6].mean(1), x[:, 6:].mean(1)], dim=1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_seed_case_28_to_4_heads():
    x = torch.randn(2, 28, 10, 16)
    out = KVProjector(28, 16, 4, 16)(x)
    assert out.shape == (2, 4, 10, 16)
    torch.testing.assert_close(out[:, 3], x[:, 21:].mean(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "bottleneck"])
def test_seed_case_28_to_2_heads_and_128_to_64_dims(kind):
    projector = KVProjector(28, 128, 2, 64, kind=kind)
    assert projector(torch.randn(2, 28, 50, 128)).shape == (2, 2, 50, 64)


def test_linear_dim_init_copies_rotary_pairs():
    x = torch.randn(1, 2, 3, 8)
    out = KVProjector(2, 8, 2, 4)(x)  # pairs (i, i+4) of the teacher -> (i, i+2) of the student
    torch.testing.assert_close(out, torch.cat([x[..., 0:2], x[..., 4:6]], -1))


def test_identical_shapes_linear_projector_is_identity_at_init():
    x = torch.randn(3, 4, 7, 16)
    torch.testing.assert_close(KVProjector(4, 16, 4, 16)(x), x)


@pytest.mark.parametrize("steps", [0, 1])
def test_zero_and_one_step_sequences(steps):
    projector = KVProjector(12, 32, 2, 16, kind="bottleneck")
    out = projector(torch.randn(2, 12, steps, 32))
    assert out.shape == (2, 2, steps, 16)
    assert resample_time(out, 5 if steps else 0).shape == (2, 2, 5 if steps else 0, 16)


def test_projection_and_time_resampling_commute():
    projector = KVProjector(12, 128, 2, 64)
    x = torch.randn(4, 12, 80, 128)
    project_then_resample = resample_time(projector(x), 50)
    resample_then_project = projector(resample_time(x, 50))
    assert project_then_resample.shape == (4, 2, 50, 64)
    torch.testing.assert_close(project_then_resample, resample_then_project)


def test_shape_mismatch_names_expected_and_got():
    projector = KVProjector(2, 32, 2, 16)
    with pytest.raises(ValueError, match=r"H_t=2.*got \(1, 4, 5, 32\).*num_key_value_heads"):
        projector(torch.randn(1, 4, 5, 32))  # query-head count passed by mistake
    with pytest.raises(ValueError, match="D_t=32"):
        projector(torch.randn(1, 2, 5, 16))
    with pytest.raises(ValueError, match="expected teacher K/V"):
        projector(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="kind"):
        KVProjector(2, 32, 2, 16, kind="conv")


def test_from_configs_uses_key_value_heads():
    from protege.tasks.tiny_models import student_config, teacher_config

    teacher, student = teacher_config(), student_config()
    assert kv_heads_and_dim(teacher) == (teacher.num_key_value_heads, 32)
    projector = KVProjector.from_configs(teacher, student, kind="bottleneck", mlp_ratio=1.5)
    assert (projector.teacher_heads, projector.teacher_dim) == (2, 32)
    assert (projector.student_heads, projector.student_dim) == (2, 16)
    assert projector.dim_proj[1].out_features == round(1.5 * 16)


@pytest.mark.parametrize("kind", ["linear", "bottleneck"])
def test_gradients_reach_every_parameter(kind):
    projector = KVProjector(6, 8, 2, 4, kind=kind, dropout=0.1)
    x = torch.randn(2, 6, 5, 8, requires_grad=True)
    projector(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, parameter in projector.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_projector_recovers_a_planted_linear_map():
    generator = torch.Generator().manual_seed(0)
    true_mix = torch.rand(2, 4, generator=generator)
    true_dim = torch.randn(6, 8, generator=generator) / 8**0.5
    x = torch.randn(16, 4, 12, 8, generator=generator)
    target = torch.einsum("st,btnd->bsnd", true_mix, x) @ true_dim.T

    torch.manual_seed(0)
    projector = KVProjector(4, 8, 2, 6)
    optimizer = torch.optim.Adam(projector.parameters(), lr=2e-2)
    losses = []
    for _ in range(300):
        loss = (projector(x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10
    assert losses[-1] < 1e-3
