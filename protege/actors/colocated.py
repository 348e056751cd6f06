"""A sampler and the teacher's scorer in one worker (`rollout.colocate_teacher: true`).

`generate` writes a shard and, given the teacher's plan, scores it in the same call and the
same process: the rollout never crosses the object store to reach the teacher, and no
teacher actor exists. Sampling and scoring are the plain `HFSampler` and `TeacherScorer`,
composed, so a colocated shard carries exactly what the two separate workers produce. The
sampler's teacher-steered decoding reads the scorer's copy of the teacher (one per process).
What can be colocated is decided before any model loads (`protege.colocation`).
"""

from __future__ import annotations

from protege.records import PromptBatch, RolloutBatch, RolloutPlan, WeightUpdate


class ColocatedSampler:
    """`sampler_cls(*sampler_args)` and `scorer_cls(*scorer_args)`, built in this process (the
    teacher first: the sampler's decoding shares its weights)."""

    def __init__(
        self, sampler_cls: type, sampler_args: tuple, scorer_cls: type, scorer_args: tuple
    ) -> None:
        self.scorer = scorer_cls(*scorer_args)
        self.sampler = sampler_cls(*sampler_args)
        self.sampler.share_teacher(self.scorer.model)

    def generate(
        self, prompts: PromptBatch, plan: RolloutPlan, teacher_plan: RolloutPlan | None = None
    ) -> RolloutBatch:
        """The sampler's shard for `prompts`, scored by the teacher as `teacher_plan` asks
        (None: not scored, as a plain sampler's)."""
        batch = self.sampler.generate(prompts, plan)
        return batch if teacher_plan is None else self.scorer.score(batch, teacher_plan)

    def score(self, batch: RolloutBatch, plan: RolloutPlan) -> RolloutBatch:
        """The teacher's outputs for a batch this worker did not sample (dataset responses,
        evaluation's KL to the teacher)."""
        return self.scorer.score(batch, plan)

    def greedy_texts(self, prompts: PromptBatch, max_new_tokens: int) -> list[str]:
        return self.sampler.greedy_texts(prompts, max_new_tokens)

    def load_weights(self, update: WeightUpdate) -> None:
        self.sampler.load_weights(update)

    def weights_version(self) -> int:
        return self.sampler.weights_version()

    @property
    def version(self) -> int:
        return self.sampler.version
