"""The trained module of KV distillation: student + per-teacher projectors + router.

One forward computes the whole loss, so the DeepSpeed engine (`TrainingEngine`) wraps it
like any model. Per student layer l and teacher i the target candidate is

    K_il = apply_rope(P^K_il(Σ_j m_ilj·K̃_ij), pos, student)     V_il = P^V_il(Σ_j m_ilj·V_ij)

(K̃: teacher keys with the teacher's RoPE undone, on the student's time axis; m: the layer
map; P: `KVProjector`), fused over teachers with α from `protege.kv.fusion`.

Projectors are frozen by default: their initialisation (grouped head averaging, rotary-pair
copy — exactly the identity for a same-shaped teacher) is a fixed map of the teacher, so the
target cannot move. Trained jointly with the student (`train_projector`), MSE has a trivial
descent direction: shrink the student's V and the projector's output together while o_proj
grows to compensate — the ablation measures that variant rather than assuming it helps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from protege.kv.batch import KVBatch
from protege.kv.config import AlignConfig, FusionConfig
from protege.kv.extract import KVSpec, LayerKV, forward_kv
from protege.kv.fusion import (
    LearnableRouter,
    PrototypeRouter,
    attention_fusion_weights,
    entropy,
    fixed_weights,
    fuse,
    pooled_features,
    task_weights,
)
from protege.kv.layer_align import LayerMap, apply_layer_map
from protege.kv.loss import LossWeights, answer_ce, kv_layer_loss
from protege.kv.projector import KVProjector
from protege.kv.rope import apply_rope


@dataclass
class StepOutput:
    loss: Tensor  # scalar to back-propagate
    metrics: dict[str, float]  # kv/... scalars
    layer_mse: list[float]  # per student layer: (MSE(K) + MSE(V)) / 2 — the heatmap's row
    routing: Tensor | None  # [B,n] mean routing weights per sample (detached), None for 1 teacher


class KVDistillModule(nn.Module):
    def __init__(
        self,
        student: nn.Module,
        student_spec: KVSpec,
        teacher_specs: Sequence[KVSpec],
        layer_maps: Sequence[LayerMap],
        align: AlignConfig,
        fusion: FusionConfig,
        train_projector: bool = False,
        task_table: Tensor | None = None,
    ):
        super().__init__()
        self.student, self.spec = student, student_spec
        self.teacher_specs, self.layer_maps = list(teacher_specs), list(layer_maps)
        self.fusion = fusion
        self.projectors = nn.ModuleDict()
        for i, spec in enumerate(teacher_specs):
            for layer in range(student_spec.layers):
                for kind in ("k", "v"):
                    self.projectors[f"{i}_{layer}_{kind}"] = KVProjector(
                        spec.kv_heads,
                        spec.head_dim,
                        student_spec.kv_heads,
                        student_spec.head_dim,
                        kind=align.projector,
                        mlp_ratio=align.mlp_ratio,
                    )
        self.projectors.requires_grad_(train_projector)
        n = len(teacher_specs)
        self.router = (
            LearnableRouter(student_spec.hidden_size, n, student_spec.layers, fusion.per_layer)
            if fusion.kind == "router" and n > 1
            else None
        )
        features = 2 * student_spec.kv_heads * student_spec.head_dim
        self.prototypes = (
            PrototypeRouter(n, features, fusion.temperature)
            if fusion.kind == "similarity"
            else None
        )
        if fusion.kind == "task" and task_table is None:
            raise ValueError("fusion.kind=task needs a task weight table")
        self.register_buffer("task_table", task_table if task_table is not None else torch.zeros(0))

    # -- targets -------------------------------------------------------------------------
    def candidates(
        self, teacher_kv: Sequence[LayerKV], batch: KVBatch
    ) -> list[list[tuple[Tensor, Tensor]]]:
        """Per teacher, per student layer: (K, V) in the student's shape and RoPE frame."""
        device = next(self.student.parameters()).device
        positions = batch.positions.to(device)
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

    def routing(self, batch: KVBatch, student, cands, mask: Tensor) -> list[Tensor]:
        """α per student layer: [B,n] or [B,T,n]."""
        n, b, layers = len(cands), batch.input_ids.shape[0], self.spec.layers
        device = mask.device
        if n == 1:
            return [torch.ones(b, 1, device=device)] * layers
        kind = self.fusion.kind
        if kind == "fixed":
            w = fixed_weights(self.fusion.weights or [1.0] * n, b).to(device)
            return [w] * layers
        if kind == "task":
            return [task_weights(batch.task_ids.to(device), self.task_table)] * layers
        if kind == "similarity":
            self.prototypes.update([pooled_features(c[0][0], c[0][1], mask) for c in cands])
            feats = pooled_features(student.kv.keys[0], student.kv.values[0], mask)
            return [self.prototypes(feats)] * layers
        if kind == "router":
            alpha = self.router(student.hidden, mask)  # [B,L_out,n]
            return [alpha[:, min(layer, alpha.shape[1] - 1)] for layer in range(layers)]
        if kind == "attention":
            return [
                attention_fusion_weights(
                    student.queries[layer].detach(),
                    [c[layer][0].detach() for c in cands],
                    self.fusion.attention_temperature,
                )
                for layer in range(layers)
            ]
        raise ValueError(f"unknown fusion kind {kind!r}")

    # -- loss ----------------------------------------------------------------------------
    def forward(
        self,
        batch: KVBatch,
        teacher_kv: Sequence[LayerKV],
        layer_weights: Sequence[float],
        weights: LossWeights,
        distill: bool = True,
    ) -> StepOutput:
        want_queries = distill and (weights.gamma > 0 or self.fusion.kind == "attention")
        student = forward_kv(self.student, batch, self.spec, with_queries=want_queries)
        device = student.logits.device
        mask = batch.attention_mask.to(device)
        ce = answer_ce(student.logits, batch.input_ids, batch.answer_mask)
        metrics = {"kv/ce": ce.item()}
        if not distill:
            return StepOutput(weights.delta * ce, metrics, [0.0] * self.spec.layers, None)
        cands = self.candidates(teacher_kv, batch)
        alphas = self.routing(batch, student, cands, mask)
        total, weight_sum, layer_mse, sums = ce.new_zeros(()), 0.0, [], {}
        for layer, w in enumerate(layer_weights):
            target_k = fuse([c[layer][0] for c in cands], alphas[layer])
            target_v = fuse([c[layer][1] for c in cands], alphas[layer])
            queries = student.queries[layer] if student.queries is not None else None
            loss, terms = kv_layer_loss(
                student.kv.keys[layer],
                student.kv.values[layer],
                target_k,
                target_v,
                mask,
                weights,
                queries,
            )
            layer_mse.append(0.5 * float(terms["mse_k"] + terms["mse_v"]))
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value) / len(layer_weights)
            if w > 0:
                total, weight_sum = total + w * loss, weight_sum + w
        kv_loss = total / max(weight_sum, 1e-12)
        loss = kv_loss + weights.delta * ce
        routing = None
        if len(cands) > 1:
            per_sample = torch.stack([_per_sample(a, mask) for a in alphas]).mean(0)  # [B,n]
            routing = per_sample.detach().cpu()
            ent = torch.stack(
                [_per_sample(entropy(a)[..., None], mask)[:, 0] for a in alphas]
            ).mean()
            metrics["kv/route_entropy"] = ent.item()
            if self.router is not None and self.fusion.entropy_weight > 0:
                loss = loss - self.fusion.entropy_weight * ent
        metrics.update({"kv/loss": kv_loss.item(), **{f"kv/{k}": v for k, v in sums.items()}})
        metrics["kv/student_v_rms"] = float(student.kv.values[-1].detach().square().mean().sqrt())
        return StepOutput(loss, metrics, layer_mse, routing)


def _per_sample(alpha: Tensor, mask: Tensor) -> Tensor:
    """[B,n] as is, or [B,T,n] averaged over real tokens -> [B,n]."""
    if alpha.dim() == 2:
        return alpha
    m = mask.to(alpha.dtype)[..., None]
    return (alpha * m).sum(1) / m.sum(1).clamp_min(1.0)
