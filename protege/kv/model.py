"""KV distillation's trainable modules and its fused per-layer loss (the student lives elsewhere).

Per student layer l and teacher i the target candidate is

    K_il = apply_rope(P^K_il(Σ_j m_ilj·K̃_ij), pos, student)     V_il = P^V_il(Σ_j m_ilj·V_ij)

(K̃: teacher keys with the teacher's RoPE undone, on the student's sequence layout; m: the
layer map; P: `KVProjector`), fused over teachers with α from `protege.kv.fusion`.

Projectors are frozen by default: their initialisation (grouped head averaging, rotary-pair
copy — exactly the identity for a same-shaped teacher) is a fixed map of the teacher, so the
target cannot move. Trained jointly with the student (`train_projector`), MSE has a trivial
descent direction: shrink the student's V and the projector's output together while o_proj
grows to compensate — the ablation measures that variant rather than assuming it helps.

Shapes: B rows, S sequence positions, H heads, D head_dim, n teachers, L student layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from protege.kv.cache import LayerKV
from protege.kv.extract import KVSpec
from protege.kv.fusion import (
    LearnableRouter,
    PrototypeRouter,
    attention_fusion_weights,
    entropy,
    fixed_weights,
    fuse,
    pooled_features,
)
from protege.kv.layer_align import LayerMap, apply_layer_map
from protege.kv.loss import LossWeights, kv_layer_loss
from protege.kv.projector import KVProjector
from protege.kv.rope import apply_rope

Fusion = str  # "fixed" | "similarity" | "router" | "attention"


@dataclass(frozen=True)
class FusionOptions:
    kind: Fusion = "fixed"
    weights: tuple[float, ...] = ()  # fixed: one per teacher (empty: uniform)
    attention_temperature: float = 1.0


class KVTargets(nn.Module):
    """Per-teacher, per-student-layer K/V projectors, plus the router or the similarity
    prototypes: teacher KV -> candidate targets in the student's shape and RoPE frame."""

    def __init__(
        self,
        student_spec: KVSpec,
        teacher_specs: Sequence[KVSpec],
        layer_maps: Sequence[LayerMap],
        projector: str = "linear",
        mlp_ratio: float = 2.0,
        train_projector: bool = False,
        fusion: Fusion = "fixed",
        per_layer_router: bool = False,
        similarity_temperature: float = 0.1,
    ):
        super().__init__()
        self.spec, self.teacher_specs = student_spec, list(teacher_specs)
        self.layer_maps = [list(m) for m in layer_maps]
        self.projectors = nn.ModuleDict()
        for i, spec in enumerate(teacher_specs):
            for layer in range(student_spec.layers):
                for kind in ("k", "v"):
                    self.projectors[f"{i}_{layer}_{kind}"] = KVProjector(
                        spec.kv_heads,
                        spec.head_dim,
                        student_spec.kv_heads,
                        student_spec.head_dim,
                        kind=projector,
                        mlp_ratio=mlp_ratio,
                    )
        self.projectors.requires_grad_(train_projector)
        n = len(teacher_specs)
        self.router = (
            LearnableRouter(student_spec.hidden_size, n, student_spec.layers, per_layer_router)
            if fusion == "router" and n > 1
            else None
        )
        features = 2 * student_spec.kv_heads * student_spec.head_dim
        self.prototypes = (
            PrototypeRouter(n, features, similarity_temperature)
            if fusion == "similarity" and n > 1
            else None
        )

    def candidates(
        self, teacher_kv: Sequence[LayerKV], positions: Tensor
    ) -> list[list[tuple[Tensor, Tensor]]]:
        """Per teacher, per student layer: (K, V) [B,H_s,S,D_s], keys in the student's RoPE
        frame at `positions` [B,S]."""
        if len(teacher_kv) != len(self.teacher_specs):
            raise ValueError(
                f"the batch carries KV of {len(teacher_kv)} teachers, the modules were built "
                f"for {len(self.teacher_specs)}"
            )
        device = positions.device
        out = []
        for i, kv in enumerate(teacher_kv):
            keys = apply_layer_map([k.to(device) for k in kv.keys], self.layer_maps[i])
            values = apply_layer_map([v.to(device) for v in kv.values], self.layer_maps[i])
            per_layer = []
            for layer, (k, v) in enumerate(zip(keys, values)):
                k = apply_rope(self.projectors[f"{i}_{layer}_k"](k), positions, self.spec.rope)
                per_layer.append((k, self.projectors[f"{i}_{layer}_v"](v)))
            out.append(per_layer)
        return out

    def routing(
        self, options: FusionOptions, student: StudentKV, cands: list, mask: Tensor
    ) -> list[Tensor]:
        """α per student layer: [B,n] or [B,S,n]."""
        n, b, layers = len(cands), mask.shape[0], self.spec.layers
        if n == 1:
            return [torch.ones(b, 1, device=mask.device)] * layers
        if options.kind == "fixed":
            return [fixed_weights(options.weights or [1.0] * n, b).to(mask.device)] * layers
        if options.kind == "similarity":
            self.prototypes.update([pooled_features(c[0][0], c[0][1], mask) for c in cands])
            feats = pooled_features(student.keys[0], student.values[0], mask)
            return [self.prototypes(feats)] * layers
        if options.kind == "router":
            alpha = self.router(student.hidden, mask)  # [B,L_out,n]
            return [alpha[:, min(layer, alpha.shape[1] - 1)] for layer in range(layers)]
        if options.kind == "attention":
            return [
                attention_fusion_weights(
                    student.queries[layer].detach(),
                    [c[layer][0].detach() for c in cands],
                    options.attention_temperature,
                )
                for layer in range(layers)
            ]
        raise ValueError(f"unknown fusion kind {options.kind!r}")


@dataclass
class StudentKV:
    """What the fused loss reads of the student's forward."""

    keys: Sequence[Tensor]  # L × [B,H_s,S,D_s] post-RoPE
    values: Sequence[Tensor]
    hidden: Tensor  # [B,S,d]
    queries: Sequence[Tensor] | None  # L × [B,H_q,S,D_s], when γ > 0 or attention fusion


def fused_kv_loss(
    targets: KVTargets,
    student: StudentKV,
    teacher_kv: Sequence[LayerKV],
    positions: Tensor,
    mask: Tensor,
    layer_weights: Sequence[float],
    weights: LossWeights,
    options: FusionOptions,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """(KV loss averaged over the weighted layers, mean routing entropy or None for one
    teacher, detached per-term means over every layer). mask [B,S] marks real tokens."""
    cands = targets.candidates(teacher_kv, positions)
    alphas = targets.routing(options, student, cands, mask)
    total, weight_sum, sums = student.keys[0].new_zeros(()), 0.0, {}
    for layer, w in enumerate(layer_weights):
        target_k = fuse([c[layer][0] for c in cands], alphas[layer])
        target_v = fuse([c[layer][1] for c in cands], alphas[layer])
        queries = student.queries[layer] if student.queries is not None else None
        loss, terms = kv_layer_loss(
            student.keys[layer], student.values[layer], target_k, target_v, mask, weights, queries
        )
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + value / len(layer_weights)
        if w > 0:
            total, weight_sum = total + w * loss, weight_sum + w
    kv_loss = total / max(weight_sum, 1e-12)
    if len(cands) == 1:
        return kv_loss, None, sums
    ent = torch.stack([_per_sample(entropy(a)[..., None], mask)[:, 0] for a in alphas]).mean()
    return kv_loss, ent, sums


def _per_sample(alpha: Tensor, mask: Tensor) -> Tensor:
    """[B,n] as is, or [B,S,n] averaged over real tokens -> [B,n]."""
    if alpha.dim() == 2:
        return alpha
    m = mask.to(alpha.dtype)[..., None]
    return (alpha * m).sum(1) / m.sum(1).clamp_min(1.0)


def cka_layer_maps(
    student_model: str,
    teacher_models: Sequence[str],
    rows: Sequence[dict[str, str]],
    top_k: int,
    temperature: float,
) -> list[LayerMap]:
    """One CKA top-k layer map per teacher from hidden states of `rows` (prompt ⧺ completion,
    teacher-forced); every teacher must tokenise them as the student does."""
    from protege.kv.batch import make_batch
    from protege.kv.layer_align import cka_layer_map, hidden_states_for_cka
    from protege.modeling import load_model, load_tokenizer

    def hidden(model: str) -> list[Tensor]:
        batch = make_batch(load_tokenizer(model), list(rows))
        return hidden_states_for_cka(
            load_model(model).eval(), batch.input_ids, batch.attention_mask.long()
        )

    student = hidden(student_model)
    maps = []
    for model in teacher_models:
        teacher = hidden(model)
        if teacher[0].shape[0] != student[0].shape[0]:
            raise ValueError(
                f"layer_map=cka: teacher {model!r} reads {teacher[0].shape[0]} tokens of the "
                f"calibration rows, the student {student[0].shape[0]} (another tokenizer); "
                "use layer_map=proportional"
            )
        maps.append(cka_layer_map(student, teacher, top_k, temperature))
    return maps
