"""Teachers as clients of the pipeline: `score(shards, plan) -> shards`, futures in and out.

Where a teacher runs is decided once, when the run is built (`place_teacher`):
* `actors` — its own worker group (HF or vLLM scorers), shard i to scorer i mod n;
* `samplers` — LoRA self-distillation on vLLM: the rollout engines score with the adapter
  off (the student's base is the teacher; no second model in memory);
* `learner` — LoRA self-distillation on HF: the learner scores with the adapter off (every
  data-parallel rank joins, ZeRO-3 gathers are collective; rank 0 answers);
* `live` — a live self-teacher (`live: true`): the learner scores with its current weights
  (adapter on), so the teacher is synced every step by construction;
* `colocated` — `rollout.colocate_teacher`: each sampler holds the teacher's scorer and
  scores the shards it writes in the same call (`protege.actors.colocated`); a shard made
  that way passes this client untouched, any other (dataset responses, evaluation) is
  scored by the samplers' scorers, shard i by sampler i mod n.
A privileged teacher (its own prompt, protege.privileged) is scored wherever it runs: the
client names its prompt in the plan, and the scorer reads that prompt from the batch.
No other module asks whether a teacher is the student itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from protege.config import TeacherConfig
from protege.records import RolloutPlan

Placement = Literal["actors", "samplers", "learner", "live", "colocated"]


def place_teacher(spec: TeacherConfig, colocate: bool = False) -> Placement:
    """Where `spec` is scored (see the module docstring); `colocate`: rollout.colocate_teacher
    (for the one HF teacher protege.colocation accepts)."""
    if not spec.is_self:
        return "colocated" if colocate else "actors"
    if spec.live:
        return "live"
    return "samplers" if spec.backend == "vllm" else "learner"


@dataclass
class TeacherClient:
    """One teacher: the handles that score for it and how shards reach them."""

    name: str
    placement: Placement
    handles: list[Any]  # scorers, samplers or learner ranks
    privileged: bool = False  # scores on its own prompt, batch.teacher_prompts[name]

    def score(self, shards: list[Any], plan: RolloutPlan) -> list[Any]:
        """One scoring call per shard, which takes and returns a future (never blocks). A
        `protege.pipeline.Shard` comes back as one, the stage joined to its replay (after a
        worker died); a plain future or batch comes back as a future."""
        if plan.teacher_need == "none":
            return shards
        plan = self.own_plan(plan)
        return [
            shard
            if self.name in getattr(shard, "scored_by", ())  # colocated: scored when sampled
            else shard.then(lambda ref, i=i: self._score_one(i, ref, plan))
            if hasattr(shard, "then")
            else self._score_one(i, shard, plan)
            for i, shard in enumerate(shards)
        ]

    def own_plan(self, plan: RolloutPlan) -> RolloutPlan:
        """`plan` as this teacher scores it: a privileged teacher reads its own prompt."""
        return replace(plan, teacher_prompt=self.name) if self.privileged else plan

    def _score_one(self, index: int, shard: Any, plan: RolloutPlan) -> Any:
        if self.placement in ("actors", "colocated"):  # a scorer, or a sampler holding one
            return self.handles[index % len(self.handles)].score.remote(shard, plan)
        if self.placement == "samplers":
            return self.handles[index % len(self.handles)].score_as_teacher.remote(shard, plan)
        if self.placement == "live":
            refs = [rank.score_live.remote(shard, plan) for rank in self.handles]
        else:
            refs = [rank.score_as_teacher.remote(shard, plan) for rank in self.handles]
        return refs[0]  # every rank joins the collective; rank 0 answers


def scoring_plan(plan: RolloutPlan, teachers: list[TeacherClient], teacher: TeacherClient):
    """The plan `teacher` scores with: with several token-level teachers it files its outputs
    under its name (the learner fuses them, `protege.fusion`); K-V teachers append theirs."""
    if len(teachers) == 1 or plan.teacher_need in ("none", "kv"):
        return plan
    return replace(plan, store_as=teacher.name)
