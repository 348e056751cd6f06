"""Typed config of a KV-distillation run; defaults live here (seed 002 §5 for the loss).

Loaded like `protege.config.load_config`: a preset (`configs/kv_distill.yaml` or a path)
plus `a.b=value` overrides; unknown keys, wrong types and out-of-range values fail at load
time naming the dotted key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from protege.config import LearnerConfig, Section, read_tree, validated


class TeacherSpec(Section):
    name: str
    model: str  # HF directory, builtin:tiny/teacher or builtin:tiny/teacher_b
    prefix: str = ""  # text the teacher reads before the shared prompt (phase 1: "two prompts")


class Phase1Config(Section):
    """Seed 002 phase 1: one model (the first teacher's) read with two prompts = two teachers."""

    enabled: bool = False
    prefixes: list[str] = Field(default_factory=lambda: ["", "12+34=46;"])


class AlignConfig(Section):
    time: Literal["resample", "segment", "char"] = "segment"
    layers: Literal["proportional", "cka"] = "proportional"
    interpolate: bool = False  # proportional map: blend the two nearest teacher layers
    cka_top_k: int = Field(2, ge=1)
    cka_temperature: float = Field(0.1, gt=0)
    cka_rows: int = Field(64, ge=2)  # calibration rows for the CKA layer map
    projector: Literal["linear", "bottleneck"] = "linear"
    train_projector: bool = False  # False: the projector's initialisation is a fixed map
    mlp_ratio: float = Field(2.0, gt=0)


class FusionConfig(Section):
    kind: Literal["fixed", "similarity", "router", "attention", "task"] = "fixed"
    weights: list[float] = Field(default_factory=list)  # fixed: one per teacher (empty: uniform)
    temperature: float = Field(0.1, gt=0)  # similarity routing: softmax(cos / temperature)
    attention_temperature: float = Field(1.0, gt=0)  # attention fusion: softmax(q·k/√D / this)
    entropy_weight: float = Field(0.01, ge=0)  # router: bonus on the weights' entropy
    per_layer: bool = False  # router: one set of weights per student layer
    task_temperature: float = Field(0.5, gt=0)  # task table: softmax(-teacher NLL / this)


class LossConfig(Section):
    lambda_k: float = Field(1.0, ge=0)
    lambda_v: float = Field(1.0, ge=0)
    beta: float = Field(0.1, ge=0)  # (1 - cosine)
    gamma: float = Field(0.0, ge=0)  # attention KL (seed: raise to 0.05 once stable)
    delta: float = Field(0.0, ge=0)  # answer CE (seed: raise to 0.1 once stable)
    layer_warmup: float = Field(0.3, ge=0, le=1)  # fraction of steps distilling shallow layers only
    shallow_fraction: float = Field(1 / 3, gt=0, le=1)


class KVDataConfig(Section):
    train: str = "builtin:tiny/train"
    test: str = "builtin:tiny/test"
    train_rows: int = Field(2000, ge=1)  # first N rows of `train`
    heldout_rows: int = Field(64, ge=1)  # test rows whose KV loss is tracked (held-out curve)


class KVTrainerConfig(Section):
    steps: int = Field(300, ge=0)
    batch_size: int = Field(32, ge=1)
    seed: int = 0
    eval_size: int = Field(200, ge=1)
    log_every: int = Field(25, ge=1)  # KV loss per layer, held-out loss, routing weights
    workers: Literal["local", "ray"] = "local"  # teachers in-process or as Ray actors
    offline: bool = True  # precompute teacher KV to safetensors shards, train from disk
    kv_dir: str | None = None  # default: <output_dir>/teacher_kv
    shard_rows: int = Field(512, ge=1)
    teacher_num_cpus: float = Field(0.5, ge=0)
    teacher_num_gpus: float = Field(0.0, ge=0)
    plots: bool = True


class KVDistillConfig(Section):
    student: str = "builtin:tiny/student"
    teachers: list[TeacherSpec] = Field(
        default_factory=lambda: [
            TeacherSpec(name="a", model="builtin:tiny/teacher"),
            TeacherSpec(name="b", model="builtin:tiny/teacher_b"),
        ]
    )
    phase1: Phase1Config = Phase1Config()
    align: AlignConfig = AlignConfig()
    fusion: FusionConfig = FusionConfig()
    loss: LossConfig = LossConfig()
    learner: LearnerConfig = LearnerConfig(lr=3e-3)
    data: KVDataConfig = KVDataConfig()
    trainer: KVTrainerConfig = KVTrainerConfig()
    distill: bool = True  # False: the "no KV distillation" control (δ·CE only)
    output_dir: str = "runs/kv_distill"

    @model_validator(mode="after")
    def _check(self) -> KVDistillConfig:
        teachers = self.effective_teachers()
        if not teachers:
            raise ValueError("teachers: need at least one teacher")
        names = [t.name for t in teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teachers: names must be unique, got {names}")
        if self.fusion.weights and len(self.fusion.weights) != len(teachers):
            raise ValueError(
                f"fusion.weights: {len(self.fusion.weights)} weights for {len(teachers)} teachers"
            )
        return self

    def effective_teachers(self) -> list[TeacherSpec]:
        """The teachers this run distils from; in phase 1, the first teacher once per prefix."""
        if not self.phase1.enabled:
            return list(self.teachers)
        base = self.teachers[0]
        return [
            TeacherSpec(name=f"{base.name}{i}", model=base.model, prefix=prefix)
            for i, prefix in enumerate(self.phase1.prefixes)
        ]


def load_kv_config(preset: str | Path | None = None, overrides: list[str] = ()) -> KVDistillConfig:
    """Config from a preset (a path or a name in configs/) plus `a.b=value` overrides."""
    return kv_config_from_dict(read_tree(preset, overrides))


def kv_config_from_dict(tree: dict[str, Any]) -> KVDistillConfig:
    return validated(KVDistillConfig, tree)
