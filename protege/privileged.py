"""Privileged-context teachers: the teacher scores the student's response after a prompt of
its own (the problem with its worked solution, a hint, a system prompt the student must
internalise), built per row from `teachers.N.prompt_field` or `teachers.N.prompt_template`.

Only the prompt differs: every scorer runs its usual forward on the teacher's prompt ⧺ the
student's response tokens (`teacher_view`), so its outputs line up with the student's
response positions exactly. The teacher's prompt ids are tokenised with the student's when
the data is read and travel in the batch (`teacher_prompts`, keyed by teacher name).
The keys themselves are checked when the config loads (protege.prompt_views).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from protege.config import Config, TeacherConfig
from protege.prompt_views import is_privileged, template_fields
from protege.records import RolloutBatch, RolloutPlan


def view_texts(config: Config) -> dict[str, Callable[[Mapping[str, str], str], str]]:
    """teacher name -> a function of (a row's text fields, where the row is) giving the text
    of that teacher's prompt, for every privileged teacher."""
    return {spec.name: _text_of(spec) for spec in config.teachers if is_privileged(spec)}


def _text_of(spec: TeacherConfig) -> Callable[[Mapping[str, str], str], str]:
    key = f"teachers.{spec.name}"
    if spec.prompt_field is not None:
        field = spec.prompt_field

        def from_field(fields: Mapping[str, str], where: str) -> str:
            if field not in fields:
                raise KeyError(
                    f"{where}: no text field {field!r}, which {key}.prompt_field reads "
                    f"(the row's text fields: {sorted(fields)})"
                )
            return fields[field]

        return from_field
    template = spec.prompt_template or ""
    names = template_fields(template)

    def from_template(fields: Mapping[str, str], where: str) -> str:
        missing = [name for name in names if name not in fields]
        if missing:
            raise KeyError(
                f"{where}: no text field {missing[0]!r}, which {key}.prompt_template "
                f"{template!r} reads (the row's text fields: {sorted(fields)})"
            )
        return template.format_map(fields)

    return from_template


def setup_problem(config: Config, plans: list[RolloutPlan], eval_teacher_kl: bool) -> str | None:
    """What a run with privileged teachers cannot do, or None: decoding steered by a teacher
    (it would need the teacher's prompt while sampling), K-V outputs (their `prefix` is that
    feature for K-V teachers), and evaluation's KL to a privileged first teacher (test rows
    carry no teacher prompts)."""
    privileged = [spec.name for spec in config.teachers if is_privileged(spec)]
    if not privileged:
        return None
    where = f"teacher {privileged[0]!r} has a privileged prompt (prompt_field/prompt_template)"
    if any(p.needs_teacher_in_decoding or p.source == "teacher" for p in plans):
        return (
            f"{where}, but the algorithm has the teacher write or steer responses while "
            "sampling (teacher-mixed sampling, rewrite, seq_kd), which reads the student's "
            "prompt; turn those off or drop the privileged prompt"
        )
    if any(p.teacher_need == "kv" for p in plans):
        return f"{where}; K-V teachers read other text through teachers.N.prefix instead"
    if any(p.cross_tokenizer != "none" for p in plans):
        return (
            f"{where}, but algorithm.cross_tokenizer re-reads the student's own text with the "
            "teacher's tokenizer; drop the privileged prompt or set cross_tokenizer=none"
        )
    if eval_teacher_kl and is_privileged(config.teacher):
        return (
            f"{where}; evaluation's KL to the teacher (trainer.eval_teacher_kl, or data.test "
            "without answers) has no teacher prompts for test rows: evaluate accuracy on "
            "answered test rows, or set trainer.eval_teacher_kl=false"
        )
    return None


def teacher_view(batch: RolloutBatch, plan: RolloutPlan) -> RolloutBatch:
    """`batch` as the teacher sees it: its privileged prompt (`plan.teacher_prompt`) in place
    of the student's, the responses unchanged; `batch` itself for an ordinary teacher."""
    name = plan.teacher_prompt
    if name is None:
        return batch
    prompts = batch.teacher_prompts
    if prompts is None or name not in prompts.ids:
        held = sorted(prompts.ids) if prompts is not None else []
        raise ValueError(
            f"teacher {name!r} scores on a privileged prompt, but the batch carries none for "
            f"it (it carries {held}); batches from the training data carry them"
        )
    return batch.replace(prompt_ids=prompts.ids[name], prompt_mask=prompts.mask[name])


def scored_on_view(
    batch: RolloutBatch, plan: RolloutPlan, score: Callable[[RolloutBatch], Any]
) -> RolloutBatch:
    """`score` run on the teacher's view of `batch`, handed back with the student's prompt:
    teacher outputs are per response position, so they fit the student's batch as they are."""
    view = teacher_view(batch, plan)
    scored = score(view)
    if view is batch:
        return scored
    return scored.replace(prompt_ids=batch.prompt_ids, prompt_mask=batch.prompt_mask)


def check_view_positions(config: Config, longest: Mapping[str, int]) -> None:
    """Each privileged teacher's longest prompt plus a full response fits in its model's
    positions (the student's, for a self-teacher); a SetupError naming the teacher if not."""
    from protege.errors import SetupError
    from protege.modeling import load_model_config
    from protege.preflight import max_positions

    for spec in config.teachers:
        if spec.name not in longest:
            continue
        model = config.student.model if spec.is_self else spec.model
        limit = max_positions(load_model_config(model))
        total = longest[spec.name] + config.rollout.max_new_tokens
        if limit is not None and total > limit:
            raise SetupError(
                f"teachers.{spec.name}: its longest privileged prompt ({longest[spec.name]} "
                f"tokens) plus rollout.max_new_tokens={config.rollout.max_new_tokens} is "
                f"{total}, over the {limit} positions of {model}; shorten the teacher's "
                "prompt (prompt_field/prompt_template) or lower rollout.max_new_tokens"
            )
