"""The `fusion:` section: how several token-level teachers become one target (issue 14).

    teachers:
      - {name: low, model: ..., weight: 1.0}
      - {name: high, model: ..., weight: 1.0}
    fusion: {mode: route, field: teacher, default: null}

* `route` — each training row names its teacher in the data field `field` (e.g.
  `"teacher": "low"`); a row without it takes `default`; the target of every token of the
  row is that teacher's distribution, exactly.
* `fixed` — every token's target is the mixture Σ_i w_i p_i with w_i = teachers.i.weight
  (normalised).
* `confidence` — per token, w_i ∝ weight_i · exp(−H(p_i) / temperature): the teacher that is
  surer of the next token (lower entropy) weighs more.
With one teacher the section is ignored. The math is in `protege.fusion`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FusionMode = Literal["route", "fixed", "confidence"]


class FusionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    mode: FusionMode = "fixed"  # route by a data field, fixed weights, or confidence
    field: str = "teacher"  # mode=route: the data field that names each row's teacher
    default: str | None = None  # mode=route: the teacher of a row without that field
    temperature: float = Field(1.0, gt=0)  # mode=confidence: entropy scale (lower: sharper)


def fusion_problem(
    fusion: FusionConfig, names: list[str], weights: list[float], plans: list
) -> str | None:
    """Why several token-level teachers cannot be fused for a run whose steps follow `plans`
    (RolloutPlans), or None; checked before any model loads."""
    if any(plan.needs_teacher_in_decoding for plan in plans):
        return (
            f"teachers: {names}, but teacher-steered decoding (MiniLLM's mix_alpha, gated "
            "dual-KL's rewrite) samples from one teacher; keep one teacher, or turn it off"
        )
    if fusion.default is not None and fusion.default not in names:
        return f"fusion.default={fusion.default!r} is not one of the teachers {names}"
    if fusion.mode != "route" and not any(weight > 0 for weight in weights):
        return (
            f"fusion.mode={fusion.mode}: every teachers.N.weight is 0 "
            f"({dict(zip(names, weights))}); give at least one teacher a positive weight"
        )
    needs = {plan.teacher_need for plan in plans} - {"none"}
    if fusion.mode == "confidence" and needs & {"sampled", "hidden"}:
        return (
            "fusion.mode=confidence weighs teachers by the entropy of their next-token "
            f"distributions, but the algorithm asks them for {sorted(needs)} outputs; use "
            "teacher_output=topk or full, or fusion.mode=route or fixed"
        )
    return None
