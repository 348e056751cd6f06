"""Multi-teacher KV-cache distillation (seeds 002/004, SPEC §3.5) as a pipeline algorithm.

Every step trains on teacher-forced dataset sequences (prompt ⧺ completion). Each teacher
client appends its per-layer K/V on the student's sequence layout (`batch.teacher_kv`, keys
with the teacher's RoPE undone); the learner-side modules (`KVTargets`: projectors, router,
similarity prototypes) map them into the student's shape and RoPE frame and fuse them. The
loss is

    Σ_l w_l·[λK·MSE(K) + λV·MSE(V) + β·(1 − cos) + γ·attention-KL] / Σ_l w_l + δ·CE

over every real token of the sequence (CE: NLL of the response tokens), minus the router's
entropy bonus; only the shallow third of the layers is distilled for the first
`layer_warmup_steps` steps. `distill=false` is the control arm: δ·CE alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import Tensor

from protege.algorithms.divergences import masked_mean
from protege.algorithms.policy_gradient import sampled_logprobs
from protege.algorithms.registry import (
    AlgorithmDefaults,
    ConstantPlan,
    ModuleContext,
    check,
    register,
)
from protege.kv.extract import KVSpec
from protege.kv.layer_align import proportional_layer_map
from protege.kv.loss import LossWeights, layer_weights
from protege.kv.model import FusionOptions, KVTargets, StudentKV, cka_layer_maps, fused_kv_loss
from protege.modeling import sequence_inputs
from protege.records import RolloutBatch, RolloutPlan

if TYPE_CHECKING:
    from protege.student import StudentForward

KV_MODULE = "kv"  # the name of the `KVTargets` module among the algorithm's modules


@register("kv_distill")
@dataclass(frozen=True)
class KVDistill(ConstantPlan, AlgorithmDefaults):
    """Students learn the teachers' per-layer K/V caches, fused, plus a small answer CE."""

    reads_teachers: ClassVar[float] = math.inf  # fuses any number of teachers

    distill: bool = True  # False: the control arm (δ·CE only; no teacher is read)
    time_align: Literal["resample", "segment", "char"] = "segment"  # teachers on other tokens
    # which teacher layers each student layer learns: proportional or CKA
    # which teacher layers each student layer learns: proportional or CKA
    layer_map: Literal["proportional", "cka"] = "proportional"
    interpolate_layers: bool = False  # proportional map: blend the two nearest teacher layers
    cka_top_k: int = 2  # cka map: each student layer learns from its k most similar layers
    cka_temperature: float = 0.1  # cka map: softmax(CKA / temperature) over those k
    cka_rows: int = 64  # cka map: first training rows whose hidden states calibrate it
    # maps student K/V to the teacher's heads/dims: linear or bottleneck MLP
    # maps student K/V to the teacher's heads/dims: linear or bottleneck MLP
    projector: Literal["linear", "bottleneck"] = "linear"
    train_projector: bool = False  # False: the projector's initialisation is a fixed map
    mlp_ratio: float = 2.0  # bottleneck width / student head_dim
    # how teachers combine: fixed weights, similarity, a learned router, attention
    # how teachers combine: fixed weights, similarity, a learned router, attention
    fusion: Literal["fixed", "similarity", "router", "attention"] = "fixed"
    fusion_weights: list[float] | None = None  # fixed: one per teacher (None: uniform)
    similarity_temperature: float = 0.1  # similarity routing: softmax(cos / temperature)
    attention_temperature: float = 1.0  # attention fusion: softmax(q·k/√D / temperature)
    entropy_weight: float = 0.01  # router: bonus on the routing weights' entropy
    per_layer_router: bool = False  # router: one set of weights per student layer
    lambda_k: float = 1.0  # weight λK of MSE(K)
    lambda_v: float = 1.0  # weight λV of MSE(V)
    beta: float = 0.1  # (1 − cosine)
    gamma: float = 0.0  # attention KL (needs the student's queries)
    delta: float = 0.1  # answer CE
    layer_warmup_steps: int = 0  # steps distilling only the shallow layers (absolute)
    shallow_fraction: float = 1 / 3  # share of the student's layers that count as shallow (warm-up)

    def __post_init__(self) -> None:
        for name in ("lambda_k", "lambda_v", "beta", "gamma", "delta", "entropy_weight"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("similarity_temperature", "attention_temperature", "mlp_ratio"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(0 < self.shallow_fraction <= 1, "shallow_fraction", "must be in (0, 1]")
        check(self.layer_warmup_steps >= 0, "layer_warmup_steps", "must be >= 0")
        check(self.cka_top_k >= 1, "cka_top_k", f"must be >= 1, got {self.cka_top_k}")
        check(self.cka_temperature > 0, "cka_temperature", "must be > 0")
        check(self.cka_rows >= 2, "cka_rows", f"must be >= 2, got {self.cka_rows}")
        weights = self.fusion_weights
        check(
            weights is None or (all(w >= 0 for w in weights) and sum(weights) > 0),
            "fusion_weights",
            f"must be >= 0 with a positive sum, got {weights}",
        )
        check(self.distill or self.delta > 0, "delta", "must be > 0 when distill is false")

    def plan(self, step: int) -> RolloutPlan:
        return RolloutPlan(
            source="dataset",
            teacher_need="kv" if self.distill else "none",
            kv_time_align=self.time_align,
        )

    def modules(self, context: ModuleContext) -> dict[str, Any]:
        if not self.distill:
            return {}
        if any(c is None for c in context.teacher_configs):
            raise ValueError("kv_distill: teacher.model=self has no KV cache of its own")
        if self.fusion_weights is not None and len(self.fusion_weights) != len(
            context.teacher_configs
        ):
            raise ValueError(
                f"algorithm.fusion_weights: {len(self.fusion_weights)} weights for "
                f"{len(context.teacher_configs)} teachers"
            )
        student = KVSpec.from_config(context.student_config)
        teachers = [KVSpec.from_config(c) for c in context.teacher_configs]
        maps = (
            self._cka_maps(context)
            if self.layer_map == "cka"
            else [
                proportional_layer_map(t.layers, student.layers, self.interpolate_layers)
                for t in teachers
            ]
        )
        targets = KVTargets(
            student,
            teachers,
            maps,
            projector=self.projector,
            mlp_ratio=self.mlp_ratio,
            train_projector=self.train_projector,
            fusion=self.fusion,
            per_layer_router=self.per_layer_router,
            similarity_temperature=self.similarity_temperature,
        )
        return {KV_MODULE: targets}

    def _cka_maps(self, context: ModuleContext) -> list:
        """CKA maps from hidden states of the first `cka_rows` training rows (computed alike
        on every learner rank: same models, same rows)."""
        from protege.data import read_jsonl

        if context.train_data is None or not context.teacher_models:
            raise ValueError("kv_distill layer_map=cka needs the teachers' models and data.train")
        rows = [
            {"prompt": row.prompt, "completion": row.completion or ""}
            for row in read_jsonl(context.train_data)[: self.cka_rows]
        ]
        return cka_layer_maps(
            context.student_model,
            context.teacher_models,
            rows,
            self.cka_top_k,
            self.cka_temperature,
        )

    def loss(self, student: StudentForward, batch: RolloutBatch) -> tuple[Tensor, dict[str, float]]:
        if not self.distill:
            ce = self._answer_ce(student, batch)
            return self.delta * ce, {"kv/ce": ce.item()}
        queries = self.gamma > 0 or self.fusion == "attention"
        student.want("kv", "hidden", *(("queries",) if queries else ()))
        ce = self._answer_ce(student, batch)
        if batch.teacher_kv is None:
            raise ValueError("kv_distill: the batch carries no teacher KV (teacher_need='kv')")
        kv = student.kv
        mask = student.sequence_mask.to(ce.device)
        positions = sequence_inputs(batch)[2].to(ce.device)
        layers = layer_weights(
            batch.step, self.layer_warmup_steps, len(kv.keys), 1.0, self.shallow_fraction
        )
        weights = LossWeights(self.lambda_k, self.lambda_v, self.beta, self.gamma, 0.0)
        options = FusionOptions(
            self.fusion, tuple(self.fusion_weights or ()), self.attention_temperature
        )
        view = StudentKV(kv.keys, kv.values, student.hidden, student.queries if queries else None)
        targets = student.modules[KV_MODULE]
        kv_loss, ent, terms = fused_kv_loss(
            targets, view, batch.teacher_kv, positions, mask, layers, weights, options
        )
        # KV terms are means over this micro-batch's real tokens; weighting each by its share
        # of the global response tokens makes micro-batches and ranks add up to the batch.
        share = batch.num_response_tokens / max(batch.normaliser(), 1e-12)
        loss = share * kv_loss + self.delta * ce
        metrics = {"kv/loss": share * kv_loss.item(), "kv/ce": ce.item()}
        metrics.update({f"kv/{key}": share * float(value) for key, value in terms.items()})
        if ent is not None:
            metrics["kv/route_entropy"] = share * ent.item()
            if targets.router is not None and self.entropy_weight > 0:
                loss = loss - share * self.entropy_weight * ent
        return loss, metrics

    @staticmethod
    def _answer_ce(student: StudentForward, batch: RolloutBatch) -> Tensor:
        """NLL of the response tokens, summed and divided by the global token count."""
        nll = -sampled_logprobs(student, batch.response_ids)
        return masked_mean(nll, batch.response_mask, batch.normaliser())
