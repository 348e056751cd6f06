"""The typed config of an online speculative distillation run (`configs/osd.yaml`).

Loaded like the training configs (a preset plus `a.b=value` overrides; unknown keys, wrong
types and out-of-range values are one ConfigError naming the dotted key). The learner and
logging sections are the training config's own; the draft is distilled by the registered
`gkd` loss, whose β picks the divergence (`divergence_beta`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from protege.config import (
    Config,
    LearnerConfig,
    LoggingConfig,
    Section,
    StudentConfig,
    TeacherConfig,
    TrainerConfig,
    read_tree,
    validated,
)

Dtype = Literal["float32", "bfloat16", "float16"]


class ModelSpec(Section):
    model: str  # local HF model directory, or builtin:tiny/...
    dtype: Dtype = "float32"


class ServingConfig(Section):
    traffic: str = "builtin:tiny/osd_traffic"  # JSONL of {"prompt": ...}, replayed in order
    num_requests: int = Field(400, ge=1)  # requests served (the file is cycled when shorter)
    rate: float = Field(0.0, ge=0)  # arrivals per second, evenly spaced; 0: back to back
    k: int = Field(4, ge=0)  # draft proposals per verification round; 0: no speculation
    temperature: float = Field(0.0, ge=0)  # 0: greedy; > 0: exact speculative sampling
    max_new_tokens: int = Field(8, ge=1)
    seed: int = 0  # sampling streams are seeded per (seed, request)
    num_cpus: float = Field(1.0, ge=0)  # Ray resources of the serving actor
    num_gpus: float = Field(0.0, ge=0)


class BufferConfig(Section):
    positions: Literal["rejected", "all"] = "rejected"  # which proposed positions are kept
    capacity: int = Field(4096, ge=1)  # records held; the oldest are dropped past it
    min_records: int = Field(64, ge=1)  # size threshold that starts an update
    max_age_s: float = Field(0.0, ge=0)  # age threshold of the oldest record; 0: off
    payload: Literal["full", "topk"] = "full"  # what of the target's distribution is kept
    topk: int = Field(8, ge=1)  # K of the top-k + tail payload


class DistillConfig(Section):
    enabled: bool = True  # false: a static draft (the buffer still fills, nothing trains)
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, gt=0, lt=1)  # JSD(β) mixture weight (divergence=jsd only)
    temperature: float = Field(1.0, gt=0)  # both distributions are compared at it
    steps_per_update: int = Field(4, ge=1)  # optimizer steps on each drained buffer


class EvalConfig(Section):
    heldout: str | None = "builtin:tiny/osd_heldout"  # JSONL of prompts never served
    heldout_size: int = Field(64, ge=1)  # prompts whose target responses give KL prefixes
    every: int = Field(50, ge=1)  # requests between metrics rows (and held-out KL)


class OSDConfig(Section):
    draft: ModelSpec = ModelSpec(model="builtin:tiny/osd_draft")
    target: ModelSpec = ModelSpec(model="builtin:tiny/teacher")
    serving: ServingConfig = ServingConfig()
    buffer: BufferConfig = BufferConfig()
    distill: DistillConfig = DistillConfig()
    learner: LearnerConfig = LearnerConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()
    workers: Literal["ray", "local"] = "ray"  # local: server and learner threads in-process
    output_dir: str = "runs/osd"  # metrics.jsonl, summary.json and the plot go here

    @model_validator(mode="after")
    def _beta_only_with_jsd(self) -> OSDConfig:
        if self.distill.divergence != "jsd" and "beta" in self.distill.model_fields_set:
            raise ValueError(
                "distill.beta is read only with distill.divergence=jsd; drop it or set "
                "distill.divergence=jsd"
            )
        return self

    @property
    def divergence_beta(self) -> float:
        """The GKD β of the divergence: 0 is forward KL(p‖q), 1 reverse KL(q‖p)."""
        return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(
            self.distill.divergence, self.distill.beta
        )

    def learner_config(self) -> Config:
        """The training config the draft's `Learner` is built from: the draft as student,
        the target as teacher (for the vocabulary only), `gkd` with this run's divergence."""
        algorithm = {
            "name": "gkd",
            "lmbda": 1.0,
            "beta": self.divergence_beta,
            "temperature": self.distill.temperature,
            "teacher_output": self.buffer.payload,
            "topk": self.buffer.topk,
        }
        steps = self.serving.num_requests * self.distill.steps_per_update
        return Config(
            student=StudentConfig(model=self.draft.model, dtype=self.draft.dtype),
            teachers=[TeacherConfig(model=self.target.model, dtype=self.target.dtype)],
            learner=self.learner,
            algorithm=algorithm,
            trainer=TrainerConfig(steps=steps, seed=self.serving.seed, workers=self.workers),
            logging=self.logging,
            output_dir=str(Path(self.output_dir) / "learner"),
        )


def load_osd_config(preset: str | Path | None = "osd", overrides: list[str] = ()) -> OSDConfig:
    """An OSDConfig from a preset (a path, or a name in configs/) plus overrides."""
    return validated(OSDConfig, read_tree(preset, list(overrides)))
