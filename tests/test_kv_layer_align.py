"""Layer alignment: proportional maps, linear CKA, CKA top-k maps, applying a map."""

from __future__ import annotations

import math

import pytest
import torch

from protege.kv.layer_align import (
    apply_layer_map,
    cka_layer_map,
    cka_matrix,
    hidden_states_for_cka,
    linear_cka,
    proportional_layer_map,
    validate_layer_map,
)


@pytest.mark.parametrize(
    "teacher_layers,student_layers", [(28, 12), (4, 2), (32, 16), (2, 5), (7, 7)]
)
def test_proportional_map_matches_relative_depth(teacher_layers, student_layers):
    hard = proportional_layer_map(teacher_layers, student_layers)
    soft = proportional_layer_map(teacher_layers, student_layers, interpolate=True)
    assert len(hard) == len(soft) == student_layers
    validate_layer_map(hard, teacher_layers)
    validate_layer_map(soft, teacher_layers)
    for s in range(student_layers):
        position = s * (teacher_layers - 1) / (student_layers - 1)
        assert hard[s] == [(math.floor(position + 0.5 + 1e-9), 1.0)]
        assert sum(t * w for t, w in soft[s]) == pytest.approx(position)
        assert all(abs(t - position) < 1 for t, _ in soft[s])
    assert hard[0] == [(0, 1.0)] and hard[-1] == [(teacher_layers - 1, 1.0)]


def test_proportional_map_examples_and_edges():
    assert proportional_layer_map(28, 12)[:4] == [[(0, 1.0)], [(2, 1.0)], [(5, 1.0)], [(7, 1.0)]]
    assert proportional_layer_map(4, 3, interpolate=True) == [
        [(0, 1.0)],
        [(1, 0.5), (2, 0.5)],
        [(3, 1.0)],
    ]
    assert proportional_layer_map(6, 6) == [[(i, 1.0)] for i in range(6)]
    assert proportional_layer_map(9, 1) == [[(8, 1.0)]]  # one-layer student: last teacher layer
    assert proportional_layer_map(1, 3) == [[(0, 1.0)]] * 3
    with pytest.raises(ValueError, match="student_layers=0"):
        proportional_layer_map(4, 0)


def _brute_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """HSIC form: CKA = HSIC(K,L)/sqrt(HSIC(K,K)·HSIC(L,L)), K = XXᵀ, H = I − 11ᵀ/n."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n

    def hsic(k, l):
        return torch.trace(k @ h @ l @ h) / (n - 1) ** 2

    k, l = x @ x.T, y @ y.T
    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def test_linear_cka_matches_hsic_definition_and_invariances():
    torch.manual_seed(0)
    x = torch.randn(40, 6)
    y = x @ torch.randn(6, 9) + 0.5 * torch.randn(40, 9)
    assert linear_cka(x, y) == pytest.approx(_brute_cka(x, y), abs=1e-10)
    noise = torch.randn(40, 3)
    assert linear_cka(x, noise) == pytest.approx(_brute_cka(x, noise), abs=1e-10)
    orthogonal, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))
    transformed = (y.double() @ orthogonal) * 3.7 + 2.0  # rotation, isotropic scale, shift
    assert linear_cka(x, transformed) == pytest.approx(linear_cka(x, y), abs=1e-10)
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert 0.0 <= linear_cka(x, torch.randn(40, 5)) < 0.5
    assert linear_cka(x[:1], y[:1]) == 0.0  # no variance
    with pytest.raises(ValueError, match="40 examples but y has 39"):
        linear_cka(x, y[:39])


def test_cka_layer_map_is_softmax_over_top_k_of_brute_force_cka():
    torch.manual_seed(1)
    base = torch.randn(30, 8)
    teacher = [base @ torch.randn(8, 8) + s * torch.randn(30, 8) for s in (0.1, 1.0, 3.0)]
    student = [base + 0.2 * torch.randn(30, 8), torch.randn(30, 4)]
    layer_map = cka_layer_map(student, teacher, top_k=2, temperature=0.5)
    similarity = torch.tensor([[_brute_cka(s, t) for t in teacher] for s in student])
    torch.testing.assert_close(cka_matrix(student, teacher), similarity.double())
    for s, entry in enumerate(layer_map):
        values, indices = similarity[s].topk(2)
        weights = torch.softmax(values.double() / 0.5, 0)
        assert [t for t, _ in entry] == indices.tolist()
        assert [w for _, w in entry] == pytest.approx(weights.tolist())
    assert len(cka_layer_map(student, teacher, top_k=10)[0]) == 3  # clipped to teacher depth


@pytest.fixture(scope="module")
def tiny_hidden():
    from protege.tasks.tiny_models import TEACHER_SHAPE, build_tiny_model, tiny_config

    model = build_tiny_model(tiny_config(*TEACHER_SHAPE), seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 30, (4, 16), generator=generator)
    attention_mask = torch.ones(4, 16, dtype=torch.long)
    attention_mask[1, 10:] = 0
    attention_mask[3, 12:] = 0
    return model, input_ids, attention_mask, hidden_states_for_cka(model, input_ids, attention_mask)


def test_hidden_states_for_cka_indexing(tiny_hidden):
    model, input_ids, attention_mask, hidden = tiny_hidden
    assert len(hidden) == model.config.num_hidden_layers
    assert all(h.shape == (int(attention_mask.sum()), model.config.hidden_size) for h in hidden)
    with torch.no_grad():
        reference = model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )
    keep = attention_mask.bool()
    torch.testing.assert_close(hidden[0], reference.hidden_states[1][keep])  # not the embeddings
    torch.testing.assert_close(hidden[-1], reference.hidden_states[-1][keep])


def test_cka_map_of_a_model_with_itself_is_the_identity(tiny_hidden):
    hidden = tiny_hidden[3]
    layers = len(hidden)
    layer_map = cka_layer_map(hidden, hidden)  # defaults: top_k=2, temperature=0.1
    for s, entry in enumerate(layer_map):
        assert entry[0][0] == s  # the diagonal carries the largest weight
        assert entry[0][1] > 0.55 and entry[0][1] > max(w for _, w in entry[1:])
    assert cka_layer_map(hidden, hidden, top_k=1) == [[(s, 1.0)] for s in range(layers)]
    sharp = cka_layer_map(hidden, hidden, temperature=0.005)
    assert all(entry[0] == (s, pytest.approx(1.0, abs=0.05)) for s, entry in enumerate(sharp))


def test_apply_layer_map_weighted_sums_and_errors():
    teacher = [torch.full((2, 3), float(i)) for i in range(4)]
    mixed = apply_layer_map(teacher, [[(1, 0.25), (3, 0.75)], [(0, 1.0)]])
    torch.testing.assert_close(mixed[0], torch.full((2, 3), 0.25 * 1 + 0.75 * 3))
    torch.testing.assert_close(mixed[1], teacher[0])
    with pytest.raises(ValueError, match="teacher layer 4"):
        apply_layer_map(teacher, [[(4, 1.0)]])
    with pytest.raises(ValueError, match="sum to 0.5"):
        apply_layer_map(teacher, [[(0, 0.5)]])
    with pytest.raises(ValueError, match="different shapes"):
        apply_layer_map([torch.zeros(2), torch.zeros(3)], [[(0, 0.5), (1, 0.5)]])
    grad_source = torch.randn(2, 3, requires_grad=True)
    apply_layer_map([grad_source, torch.zeros(2, 3)], [[(0, 0.5), (1, 0.5)]])[0].sum().backward()
    torch.testing.assert_close(grad_source.grad, torch.full((2, 3), 0.5))
