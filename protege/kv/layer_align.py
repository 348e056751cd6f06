"""Layer alignment: which teacher layers each student layer learns from.

A `LayerMap` has one entry per student layer: (teacher layer, weight) pairs whose weights
sum to 1. Maps always go student → teacher, so every student layer gets a target even when
the student is deeper than the teacher. Two ways to build one (SPEC §3.5): by depth
(`proportional_layer_map`) or by representation similarity (`cka_layer_map`, linear CKA of
hidden states, Kornblith et al. 2019).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

LayerMap = list[list[tuple[int, float]]]


def proportional_layer_map(
    teacher_layers: int, student_layers: int, interpolate: bool = False
) -> LayerMap:
    """Map student layers to teacher layers at the same relative depth.

    Student layer s sits at teacher position p = s·(L_t−1)/(L_s−1): first→first and
    last→last. This is the seed's l_s = round(l_t·L_s/L_t) read student → teacher, so every
    student layer gets a target. Without `interpolate` s takes teacher layer round(p)
    (halves up); with it, the two neighbouring teacher layers with linear weights
    (1−frac(p), frac(p)), zero weights dropped. A one-layer student takes the last teacher
    layer (the deepest representation, the one closest to the output it must reproduce).
    """
    if teacher_layers < 1 or student_layers < 1:
        raise ValueError(
            f"layer counts must be >= 1, got teacher_layers={teacher_layers}, "
            f"student_layers={student_layers}"
        )
    if student_layers == 1:
        return [[(teacher_layers - 1, 1.0)]]
    layer_map: LayerMap = []
    for s in range(student_layers):
        numerator, denominator = s * (teacher_layers - 1), student_layers - 1
        if not interpolate:
            layer_map.append([((2 * numerator + denominator) // (2 * denominator), 1.0)])
            continue
        lower, remainder = divmod(numerator, denominator)
        upper_weight = remainder / denominator
        entry = [(lower, 1.0 - upper_weight)]
        if remainder:
            entry.append((lower + 1, upper_weight))
        layer_map.append(entry)
    return layer_map


def _centred(x: Tensor) -> Tensor:
    """float64 copy of x [N,D] with column means removed."""
    x = x.detach().to(torch.float64)
    return x - x.mean(0, keepdim=True)


def _cka_centred(x: Tensor, y: Tensor) -> float:
    """Linear CKA of already-centred [N,D1] and [N,D2]; 0 when either has no variance."""
    cross = (y.T @ x).square().sum()
    norms = (x.T @ x).square().sum().sqrt() * (y.T @ y).square().sum().sqrt()
    return float(cross / norms) if norms > 0 else 0.0


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Centred linear CKA of two representations of the same N examples. [N,D1], [N,D2].

    CKA = ‖Y_cᵀX_c‖²_F / (‖X_cᵀX_c‖_F·‖Y_cᵀY_c‖_F), computed in float64; in [0, 1],
    invariant to orthogonal transforms and isotropic scaling of either side. A side with no
    variance (e.g. N = 1) gives 0.
    """
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"x and y must be [N,D], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
    return _cka_centred(_centred(x), _centred(y))


def cka_matrix(student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor]) -> Tensor:
    """S[s,t] = linear_cka(student layer s, teacher layer t). -> float64 [L_s,L_t]."""
    students = [_centred(h) for h in student_hidden]
    teachers = [_centred(h) for h in teacher_hidden]
    for name, layers in (("student", students), ("teacher", teachers)):
        for i, h in enumerate(layers):
            if h.dim() != 2 or h.shape[0] != students[0].shape[0]:
                raise ValueError(
                    f"{name} layer {i} must be [N={students[0].shape[0]},D], got {tuple(h.shape)}"
                )
    similarity = torch.zeros(len(students), len(teachers), dtype=torch.float64)
    for s, x in enumerate(students):
        for t, y in enumerate(teachers):
            similarity[s, t] = _cka_centred(x, y)
    return similarity


def cka_layer_map(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    top_k: int = 2,
    temperature: float = 0.1,
) -> LayerMap:
    """Each student layer takes its `top_k` most CKA-similar teacher layers, weighted by
    softmax(CKA / temperature) over those k. Entries are ordered by decreasing weight.

    student_hidden[s] [N,D_s] and teacher_hidden[t] [N,D_t] are hidden states of the same N
    tokens (see `hidden_states_for_cka`); top_k is clipped to the teacher's depth.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not student_hidden or not teacher_hidden:
        raise ValueError(
            f"need at least one layer on each side, got {len(student_hidden)} student and "
            f"{len(teacher_hidden)} teacher layers"
        )
    similarity = cka_matrix(student_hidden, teacher_hidden)
    values, indices = similarity.topk(min(top_k, similarity.shape[1]), dim=1)
    weights = torch.softmax(values / temperature, dim=1)
    return [
        [(int(t), float(w)) for t, w in zip(row_indices, row_weights)]
        for row_indices, row_weights in zip(indices, weights)
    ]


@torch.no_grad()
def hidden_states_for_cka(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor
) -> list[Tensor]:
    """Per-layer hidden states of the non-pad positions of a HF causal LM. -> L × [N,D].

    Element l is the output of decoder layer l (HF's hidden_states[l + 1]; the embedding
    output hidden_states[0] is dropped), so it lines up with KV-cache layer l. As HF returns
    it, the last element has the model's final norm applied. N = attention_mask.sum(); rows
    are in batch-major order, so the same (input_ids, attention_mask) gives the same rows
    for teacher and student (the tokenizers must match for CKA to compare them).
    """
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        use_cache=False,
    )
    keep = attention_mask.bool()
    return [h[keep].float() for h in outputs.hidden_states[1:]]


def validate_layer_map(layer_map: LayerMap, teacher_layers: int) -> None:
    """Raise ValueError naming the student layer whose entry is empty, out of range, or
    whose weights do not sum to 1."""
    for s, entry in enumerate(layer_map):
        if not entry:
            raise ValueError(f"layer map entry for student layer {s} is empty")
        for t, _ in entry:
            if not 0 <= t < teacher_layers:
                raise ValueError(
                    f"student layer {s} maps to teacher layer {t}, outside [0, {teacher_layers - 1}]"
                )
        total = sum(w for _, w in entry)
        if abs(total - 1.0) > 1e-4:
            raise ValueError(f"weights for student layer {s} sum to {total}, not 1")


def apply_layer_map(teacher_per_layer: Sequence[Tensor], layer_map: LayerMap) -> list[Tensor]:
    """Weighted sums of teacher layers, one per student layer. L_t × [...] -> L_s × [...].

    The tensors combined for one student layer must share a shape (project first if the
    teacher's layers differ).
    """
    validate_layer_map(layer_map, len(teacher_per_layer))
    mixed = []
    for s, entry in enumerate(layer_map):
        shapes = {tuple(teacher_per_layer[t].shape) for t, _ in entry}
        if len(shapes) > 1:
            raise ValueError(f"student layer {s} mixes teacher layers of different shapes {shapes}")
        first_layer, first_weight = entry[0]
        total = teacher_per_layer[first_layer] * first_weight
        for t, w in entry[1:]:
            total = total + teacher_per_layer[t] * w
        mixed.append(total)
    return mixed
