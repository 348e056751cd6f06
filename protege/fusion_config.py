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
* `learned` — per row, α = a small router on the student's own (detached) prompt hidden
  states, trained in the learner on the mixture-of-experts likelihood of the rewarded
  responses (`protege.router`; options in `fusion.router`). Needs a reward (`reward.rules`
  or `reward.models`). Rows carrying `field` are only a diagnostic (`router/agreement`) unless
  `router.label_weight` > 0.
With one teacher the section is ignored. The math is in `protege.fusion`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FusionMode = Literal["route", "fixed", "confidence", "learned"]


class RouterConfig(BaseModel):
    """`fusion.router`: the learned router (mode=learned) and its own Adam optimizer."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # the hidden states the router reads: of the student as it was at the start (a frozen
    # copy: what the router learned about a prompt stays true) or of the live student
    features: Literal["initial", "live"] = "initial"
    lr: float = Field(1e-2, gt=0)  # Adam learning rate of the router (not the student's)
    width: int = Field(32, ge=1)  # hidden width of the router's MLP
    entropy_bonus: float = Field(0.0, ge=0)  # + bonus·H(α) per row: keeps each α soft
    # + balance·H(ᾱ), ᾱ the batch's mean α: MoE load balancing against routing every row to
    # one teacher (0: off; set it to 0 when one teacher should own most rows)
    balance: float = Field(1.0, ge=0)
    warmup_steps: int = Field(0, ge=0)  # steps whose target uses the prior weights (it trains)
    label_weight: float = Field(0.0, ge=0)  # cross-entropy on rows' `fusion.field` labels


class FusionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    mode: FusionMode = "fixed"  # route by a data field, fixed weights, confidence, learned router
    field: str = "teacher"  # mode=route: the data field that names each row's teacher
    default: str | None = None  # mode=route: the teacher of a row without that field
    temperature: float = Field(1.0, gt=0)  # mode=confidence: entropy scale (lower: sharper)
    router: RouterConfig = RouterConfig()  # mode=learned: the router's training


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


def router_problem(
    fusion: FusionConfig, algorithm: str, rewarded: bool, advantages_at_controller: bool
) -> str | None:
    """Why fusion.mode=learned cannot train its router in this run, or None; checked before
    any model loads. The router learns from rewarded responses, in the learner."""
    if fusion.mode != "learned":
        return None
    if not rewarded:
        return (
            "fusion.mode=learned trains its router on the teachers' likelihood of rewarded "
            "responses, but no reward is configured; add a rule (on the built-in task: "
            "reward.rules='[{name: exact_match}]') or reward.models, or use fusion.mode=route, "
            "fixed or confidence"
        )
    if advantages_at_controller:
        return (
            f"fusion.mode=learned: algorithm {algorithm!r} computes its advantages at the "
            "controller from the fused teacher log-probs, but the learned weights exist only "
            "in the learner; use a loss algorithm (gkd, distillm, taid, ...), or "
            "fusion.mode=route, fixed or confidence"
        )
    return None
