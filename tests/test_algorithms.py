"""Algorithms: shared property tests over the whole registry, then per-algorithm behaviour.

Every registered algorithm gets the shared tests automatically: it runs on a synthetic batch
shaped by its own `plan(0)`, backprops, sends no gradient to padding, gives the same
gradient when the batch is split into micro-batches, and (when it reads a teacher) has zero
loss when the teacher is the student.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from protege.algorithms import ALGORITHMS as REGISTERED
from protege.algorithms import build_algorithm
from protege.algorithms.advantages import whiten
from protege.algorithms.divergences import (
    forward_kl,
    generalized_jsd,
    kl_from_logprobs,
    log_probs,
    masked_mean,
    reverse_kl,
)
from protege.algorithms.gated_dual_kl import restrict_to_teacher_support, step_means
from protege.algorithms.policy_gradient import clipped_surrogate, token_logprobs
from protege.algorithms.registry import AlgorithmConfigError, distinct_plans
from protege.records import RolloutBatch, RolloutPlan, TokenSource
from protege.student import StudentLogits

VOCAB, TOKENS, PROMPTS = 11, 6, 3

# Extra hyper-parameter settings worth covering for the built-in algorithms; algorithms
# registered later are covered through their defaults (and teacher forms) automatically.
EXTRA_VARIANTS: dict[str, list[dict]] = {
    "gkd": [{"beta": 0.0}, {"beta": 1.0, "temperature": 2.0}, {"seq_kd": True, "lmbda": 0.0}],
    "minillm": [
        {"mix_alpha": 0.0, "whiten_advantages": False},
        {"single_step": False, "gamma": 0.9},
        {"long_term": False, "max_importance_weight": 1.5},
    ],
    "gated_dual_kl": [
        {"gate": "hard", "tau": 0.5},
        {"granularity": "step", "step_delimiter_id": 3, "clip_kl": 2.0},
        {"support_topk": 3, "temperature": 0.7},
    ],
    "rl_distill": [
        {"estimator": "reinforce", "samples_per_prompt": 1},
        {"estimator": "rloo", "alpha_end": 0.1, "alpha_schedule": "cosine", "schedule_steps": 10},
        {"distill": "analytic", "beta": 0.5},
    ],
    "opd": [{"gamma": 0.9}, {"clip_eps": 0.2}],
}

# Algorithms whose default loss reads more of the student than its logits run the shared
# tests in their logits-only form (KV distillation's K/V loss needs a real student and
# teacher caches: tests/test_kv_distill.py).
LOGITS_ONLY: dict[str, dict] = {"kv_distill": {"distill": False}}

TEACHER_FORMS = [
    {"teacher_output": "topk", "topk": 4},  # K < V
    {"teacher_output": "topk", "topk": VOCAB},  # K = V
    {"teacher_output": "full"},
]

# Every algorithm the package ships (tests register toy algorithms of their own).
ALGORITHMS = {n: c for n, c in REGISTERED.items() if c.__module__.startswith("protege.")}


def variants() -> list:
    params = []
    for name in sorted(ALGORITHMS):
        cls = ALGORITHMS[name]
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        for extra in [{}] + EXTRA_VARIANTS.get(name, []):
            extra = {**LOGITS_ONLY.get(name, {}), **extra}
            forms = [{}]
            if "teacher_output" in fields and cls(**extra).plan(0).teacher_need in ("topk", "full"):
                forms = TEACHER_FORMS
            for form in forms:
                kwargs = {**extra, **form}
                label = ",".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"
                params.append(pytest.param(name, kwargs, id=f"{name}[{label}]"))
    return params


ALL_VARIANTS = variants()


def make_algorithm(name: str, kwargs: dict):
    return build_algorithm({"name": name, **kwargs})  # also exercises the registry's checks


def make_batch(
    algorithm, *, seed: int = 0, same_teacher: bool = False, step: int = 0
) -> tuple[torch.Tensor, RolloutBatch]:
    """(student logits [B,T,V] requiring grad, a batch shaped as algorithm.plan(step) asks),
    with the teacher outputs a top-k/full scorer ships and the rollout's log-probs."""
    plan = algorithm.plan(step)
    generator = torch.Generator().manual_seed(seed)
    rows = PROMPTS * plan.samples_per_prompt
    lengths = torch.randint(1, TOKENS + 1, (rows,), generator=generator)
    lengths[0], lengths[-1] = 1, TOKENS  # a one-token response and a full one
    mask = torch.arange(TOKENS) < lengths.unsqueeze(-1)
    response_ids = torch.randint(0, VOCAB, (rows, TOKENS), generator=generator).masked_fill(
        ~mask, 0
    )
    student_logits = 1.5 * torch.randn(rows, TOKENS, VOCAB, generator=generator)
    teacher_logits = 2.0 * torch.randn(rows, TOKENS, VOCAB, generator=generator)
    old_logits = student_logits + 0.1 * torch.randn(rows, TOKENS, VOCAB, generator=generator)
    rewards = torch.randn(rows, generator=generator)
    if same_teacher:
        teacher_logits, old_logits, rewards = student_logits, student_logits, torch.zeros(rows)

    def sampled(logits):
        return token_logprobs(logits, response_ids).masked_fill(~mask, 0.0)

    student_lp, teacher_lp = sampled(old_logits), sampled(teacher_logits)
    source = {
        "student": TokenSource.STUDENT,
        "teacher": TokenSource.TEACHER,
        "dataset": TokenSource.DATASET,
    }
    token_source = torch.full((rows, TOKENS), int(source[plan.source]), dtype=torch.int8)
    behaviour = {"student": student_lp, "teacher": teacher_lp, "dataset": None}[plan.source]
    if plan.mix_alpha > 0:  # tokens drawn from p~ = a p_T + (1 - a) q
        mixture = plan.mix_alpha * teacher_lp.exp() + (1 - plan.mix_alpha) * student_lp.exp()
        behaviour = mixture.log().masked_fill(~mask, 0.0)
    if plan.rewrite is not None and not same_teacher:  # some tokens rewritten by the teacher
        rewritten = (torch.rand(rows, TOKENS, generator=generator) < 0.3) & mask
        token_source = token_source.masked_fill(rewritten, int(TokenSource.TEACHER))
        behaviour = behaviour.masked_fill(rewritten, 0.0)  # argmax rewrite: log 1
    fields: dict = {}
    if plan.teacher_need != "none":
        fields["teacher_logprobs"] = teacher_lp
    if plan.teacher_need == "topk":
        tempered = log_probs(teacher_logits, plan.temperature)
        values, ids = tempered.topk(min(plan.topk, VOCAB), dim=-1)
        fields.update(teacher_topk_ids=ids, teacher_topk_logprobs=values)
        if seed % 2:  # the exact tail, as the scorer ships it; else inferred from the top-k mass
            tail = tempered.scatter(-1, ids, -math.inf).logsumexp(-1)
            fields["teacher_tail_logprobs"] = tail
    if plan.teacher_need == "full":
        fields["teacher_logits"] = teacher_logits.clone()
    batch = RolloutBatch(
        prompt_ids=torch.randint(1, VOCAB, (rows, 2), generator=generator),
        prompt_mask=torch.ones(rows, 2, dtype=torch.bool),
        response_ids=response_ids,
        response_mask=mask,
        token_source=token_source,
        behaviour_logprobs=behaviour,
        student_logprobs=student_lp,
        rewards=rewards,
        group_ids=torch.arange(PROMPTS).repeat_interleave(plan.samples_per_prompt),
        step=step,
        **fields,
    )
    return student_logits.clone().requires_grad_(True), batch


def loss_and_grad(algorithm, logits, batch):
    logits = logits.detach().clone().requires_grad_(True)
    loss, metrics = algorithm.loss(StudentLogits(logits), batch)
    loss.backward()
    return loss, metrics, logits.grad


# ---------------------------------------------------------------- shared properties


@pytest.mark.parametrize("name,kwargs", ALL_VARIANTS)
def test_runs_and_backprops(name, kwargs):
    algorithm = make_algorithm(name, kwargs)
    logits, batch = make_batch(algorithm, seed=1)
    batch = algorithm.advantages(batch)
    loss, metrics, grad = loss_and_grad(algorithm, logits, batch)
    assert loss.dim() == 0 and loss.isfinite()
    assert metrics and all(isinstance(k, str) and isinstance(v, float) for k, v in metrics.items())
    assert all(math.isfinite(v) for v in metrics.values())
    assert grad.isfinite().all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name,kwargs", ALL_VARIANTS)
def test_no_gradient_reaches_padding(name, kwargs):
    algorithm = make_algorithm(name, kwargs)
    logits, batch = make_batch(algorithm, seed=2)
    _, _, grad = loss_and_grad(algorithm, logits, algorithm.advantages(batch))
    assert grad[~batch.response_mask].eq(0).all()


@pytest.mark.parametrize("name,kwargs", ALL_VARIANTS)
def test_micro_batches_add_up_to_the_whole_batch(name, kwargs):
    algorithm = make_algorithm(name, kwargs)
    logits, batch = make_batch(algorithm, seed=3)
    batch = algorithm.advantages(batch)  # on the whole batch (whitening, group baselines)
    whole_loss, whole_metrics, whole_grad = loss_and_grad(algorithm, logits, batch)
    for size in (1, 2, 5):
        start, total, grad = 0, 0.0, torch.zeros_like(whole_grad)
        metrics = dict.fromkeys(whole_metrics, 0.0)
        for part in batch.split(size):
            rows = slice(start, start + part.size)
            loss, part_metrics, part_grad = loss_and_grad(algorithm, logits[rows], part)
            total += loss.item()
            grad[rows] += part_grad
            for key, value in part_metrics.items():
                metrics[key] += value
            start += part.size
        assert start == batch.size
        assert total == pytest.approx(whole_loss.item(), rel=1e-5, abs=1e-6)
        torch.testing.assert_close(grad, whole_grad, rtol=1e-5, atol=1e-6)
        # the learner sums metrics over micro-batches and ranks, so they must add up too
        assert metrics == pytest.approx(whole_metrics, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    "name,kwargs",
    [p for p in ALL_VARIANTS if make_algorithm(*p.values).plan(0).teacher_need != "none"],
)
def test_teacher_equal_to_student_gives_zero_loss(name, kwargs):
    algorithm = make_algorithm(name, kwargs)
    logits, batch = make_batch(algorithm, seed=4, same_teacher=True)
    loss, _, grad = loss_and_grad(algorithm, logits, algorithm.advantages(batch))
    assert abs(loss.item()) < 1e-5
    assert grad.abs().max().item() < 1e-5


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_registered_algorithms_are_frozen_with_a_plan(name):
    algorithm = ALGORITHMS[name]()
    assert algorithm.name == name
    assert dataclasses.is_dataclass(algorithm)
    fields = dataclasses.fields(algorithm)
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(algorithm, fields[0].name, None)
    plan = algorithm.plan(0)
    assert plan.teacher_need in ("none", "sampled", "topk", "full", "kv")
    assert plan.source in ("student", "dataset", "teacher")


@pytest.mark.parametrize("name,kwargs", variants())
def test_distinct_plans_are_every_plan_of_the_run(name, kwargs):
    """The start-up checks read `distinct_plans`: it must hold every plan some step uses,
    each once, in order of first use, and nothing no step uses."""
    algorithm = make_algorithm(name, kwargs)
    every = [algorithm.plan(step) for step in range(2000)]
    assert distinct_plans(algorithm, 2000) == tuple(dict.fromkeys(every))
    declared = algorithm.plan_variants()
    if declared is not None:
        assert set(every) <= set(declared)


def test_distinct_plans_of_a_long_run_stop_once_every_variant_is_met():
    """`trainer.steps=10**7` must not cost a plan per step at start-up."""
    calls = []

    @dataclasses.dataclass(frozen=True)
    class Counted(ALGORITHMS["gkd"]):
        def plan(self, step):
            calls.append(step)
            return super().plan(step)

    plans = distinct_plans(Counted(lmbda=0.5), 10**7)
    assert {plan.source for plan in plans} == {"student", "dataset"}
    assert len(calls) < 100
    calls.clear()
    assert [p.source for p in distinct_plans(Counted(lmbda=1.0), 10**7)] == ["student"]
    assert calls == [0]


def test_distinct_plans_ask_every_step_of_an_algorithm_that_declares_no_variants():
    class EveryThird:  # a user's algorithm: its plan changes with the step, undeclared
        def plan(self, step):
            return RolloutPlan(teacher_need="sampled" if step % 3 else "topk", topk=4)

    assert [p.teacher_need for p in distinct_plans(EveryThird(), 7)] == ["topk", "sampled"]
    assert distinct_plans(EveryThird(), 1) == (RolloutPlan(teacher_need="topk", topk=4),)
    assert distinct_plans(EveryThird(), 0) == ()


def test_registry_errors_name_the_key():
    with pytest.raises(AlgorithmConfigError, match=r"algorithm\.name"):
        build_algorithm({"name": "nope"})
    with pytest.raises(AlgorithmConfigError, match=r"algorithm\.betta"):
        build_algorithm({"name": "gkd", "betta": 0.5})
    with pytest.raises(AlgorithmConfigError, match=r"algorithm\.beta"):
        build_algorithm({"name": "gkd", "beta": "high"})
    with pytest.raises(AlgorithmConfigError, match=r"algorithm\.beta"):
        build_algorithm({"name": "gkd", "beta": 2})
    with pytest.raises(AlgorithmConfigError, match=r"algorithm\.samples_per_prompt"):
        build_algorithm({"name": "rl_distill", "estimator": "group", "samples_per_prompt": 1})


# ---------------------------------------------------------------- GKD and SFT


@pytest.mark.parametrize("lmbda", [0.2, 0.5, 0.9])
def test_gkd_mixes_on_and_off_policy_with_frequency_lambda(lmbda):
    algorithm = make_algorithm("gkd", {"lmbda": lmbda})
    sources = [algorithm.plan(k).source for k in range(4000)]
    assert abs(sources.count("student") / len(sources) - lmbda) < 0.03
    assert set(sources) == {"student", "dataset"}
    again = make_algorithm("gkd", {"lmbda": lmbda})  # deterministic per step, across instances
    assert [again.plan(k).source for k in range(4000)] == sources
    other_seed = make_algorithm("gkd", {"lmbda": lmbda, "seed": 1})
    assert [other_seed.plan(k).source for k in range(4000)] != sources


def test_gkd_lambda_endpoints_and_seq_kd():
    never = make_algorithm("gkd", {"lmbda": 0.0})
    always = make_algorithm("gkd", {"lmbda": 1.0})
    seq_kd = make_algorithm("gkd", {"lmbda": 0.3, "seq_kd": True})
    assert {never.plan(k).source for k in range(1000)} == {"dataset"}
    assert {always.plan(k).source for k in range(1000)} == {"student"}
    assert {seq_kd.plan(k).source for k in range(1000)} == {"student", "teacher"}
    plan = make_algorithm("gkd", {"temperature": 2.0, "topk": 7}).plan(0)
    assert (plan.teacher_need, plan.topk, plan.temperature) == ("topk", 7, 2.0)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_gkd_loss_is_the_masked_mean_jsd(beta):
    full = make_algorithm("gkd", {"beta": beta, "temperature": 1.5, "teacher_output": "full"})
    logits, batch = make_batch(full, seed=5)
    loss, metrics = full.loss(StudentLogits(logits), batch)
    per_token = generalized_jsd(logits, batch.teacher_logits, beta, 1.5)
    expected = per_token[batch.response_mask].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["gkd/jsd"] == pytest.approx(loss.item())
    topk = make_algorithm("gkd", {"beta": beta, "temperature": 1.5, "topk": VOCAB})
    _, topk_batch = make_batch(topk, seed=5)
    assert topk.loss(StudentLogits(logits), topk_batch)[0].item() == pytest.approx(
        expected.item(), rel=1e-5
    )


def test_sft_loss_is_the_token_nll():
    sft = make_algorithm("sft", {})
    logits, batch = make_batch(sft, seed=6)
    loss, _ = sft.loss(StudentLogits(logits), batch)
    logp = torch.log_softmax(logits.double(), -1)
    terms = [
        -logp[b, t, batch.response_ids[b, t]].item()
        for b in range(batch.size)
        for t in range(TOKENS)
        if batch.response_mask[b, t]
    ]
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


# ---------------------------------------------------------------- MiniLLM


def minillm_returns_loop(batch, gamma, length_normalise, include_current):
    rewards = batch.teacher_logprobs - batch.student_logprobs
    out = torch.zeros_like(rewards)
    for b in range(batch.size):
        positions = [t for t in range(TOKENS) if batch.response_mask[b, t]]
        for t in positions:
            later = [i for i in positions if i > t or (include_current and i == t)]
            offset = t if include_current else t + 1
            total = sum(gamma ** (i - offset) * rewards[b, i].item() for i in later)
            out[b, t] = total / len(later) if length_normalise and later else total
    return out


@pytest.mark.parametrize("single_step", [True, False])
@pytest.mark.parametrize("gamma", [1.0, 0.8])
@pytest.mark.parametrize("length_normalise", [True, False])
def test_minillm_returns_match_loops(length_normalise, gamma, single_step):
    algorithm = make_algorithm(
        "minillm",
        {
            "gamma": gamma,
            "length_normalise": length_normalise,
            "whiten_advantages": False,
            "single_step": single_step,
        },
    )
    _, batch = make_batch(algorithm, seed=7)
    out = algorithm.advantages(batch)
    # r_t is owned by the exact single-step term when it is on, else it is part of R_t
    expected = minillm_returns_loop(batch, gamma, length_normalise, include_current=not single_step)
    torch.testing.assert_close(out.advantages, expected, rtol=1e-5, atol=1e-6)
    whitened = make_algorithm(
        "minillm",
        {"gamma": gamma, "length_normalise": length_normalise, "single_step": single_step},
    ).advantages(batch)
    torch.testing.assert_close(whitened.advantages, whiten(expected, batch.response_mask))


def test_minillm_importance_weights_are_q_over_mixture():
    alpha = 0.3
    algorithm = make_algorithm("minillm", {"mix_alpha": alpha})
    assert algorithm.plan(0).mix_alpha == alpha and algorithm.plan(0).needs_teacher_in_decoding
    _, batch = make_batch(algorithm, seed=8)
    weights = algorithm.advantages(batch).importance_weights
    for b in range(batch.size):
        for t in range(TOKENS):
            if not batch.response_mask[b, t]:
                assert weights[b, t].item() == 0.0
                continue
            q = math.exp(batch.student_logprobs[b, t].item())
            p = math.exp(batch.teacher_logprobs[b, t].item())
            assert weights[b, t].item() == pytest.approx(
                q / (alpha * p + (1 - alpha) * q), rel=1e-5
            )
    real = weights[batch.response_mask]
    assert (real - 1).abs().max() > 0.05  # the behaviour policy genuinely differs from q
    clamped = make_algorithm("minillm", {"mix_alpha": alpha, "max_importance_weight": 1.1})
    assert clamped.advantages(batch).importance_weights.max().item() <= 1.1 + 1e-6
    pure = make_algorithm("minillm", {"mix_alpha": 0.0})
    _, pure_batch = make_batch(pure, seed=8)
    pure_weights = pure.advantages(pure_batch).importance_weights
    assert torch.equal(pure_weights, pure_batch.response_mask.float())


def test_minillm_loss_by_hand():
    algorithm = make_algorithm(
        "minillm", {"mix_alpha": 0.2, "teacher_output": "full", "single_step_coef": 0.7}
    )
    logits, batch = make_batch(algorithm, seed=9)
    batch = algorithm.advantages(batch)
    loss, metrics = algorithm.loss(StudentLogits(logits), batch)
    mask, w = batch.response_mask, batch.importance_weights
    logq = torch.log_softmax(logits, -1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    ratio = (logq - batch.student_logprobs).exp()
    pg = -torch.minimum(ratio * batch.advantages, ratio.clamp(0.8, 1.2) * batch.advantages)
    single = reverse_kl(logits, batch.teacher_logits)
    expected = (w * pg + 0.7 * w * single)[mask].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["minillm/single_step"] == pytest.approx(
        (w * single)[mask].mean().item(), rel=1e-5
    )
    assert algorithm.plan(0).pretrain_weight == algorithm.lm_coef
    assert make_algorithm("minillm", {"single_step": False}).plan(0).teacher_need == "sampled"


# ---------------------------------------------------------------- gated dual-KL


def gated_batch(seed=10, **kwargs):
    algorithm = make_algorithm(
        "gated_dual_kl", {"teacher_output": "full", "rewrite": False, **kwargs}
    )
    logits, batch = make_batch(algorithm, seed=seed)
    return algorithm, logits, batch


def test_gated_hard_gate_picks_reverse_below_tau_and_forward_above():
    probe, logits, batch = gated_batch()
    temperature = probe.temperature
    reverse = reverse_kl(logits, batch.teacher_logits, temperature)
    forward = forward_kl(logits, batch.teacher_logits, temperature)
    mask = batch.response_mask
    tau = reverse[mask].median().item() + 1e-4  # both branches occur
    algorithm = make_algorithm(
        "gated_dual_kl", {"teacher_output": "full", "rewrite": False, "gate": "hard", "tau": tau}
    )
    loss, metrics = algorithm.loss(StudentLogits(logits), batch)
    expected = torch.where(reverse < tau, reverse, forward)[mask].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    hard = (reverse >= tau)[mask].float().mean().item()
    assert 0 < hard < 1 and metrics["gated/hard_fraction"] == pytest.approx(hard, rel=1e-5)
    assert not torch.allclose(reverse[mask], forward[mask])  # the gate matters


def test_gated_soft_gate_interpolates_with_a_detached_gate():
    algorithm, logits, batch = gated_batch(gate="soft", tau=1.5, sharpness=2.0)
    loss, _ = algorithm.loss(StudentLogits(logits), batch)
    (grad,) = torch.autograd.grad(loss, logits)
    reverse = reverse_kl(logits, batch.teacher_logits)
    forward = forward_kl(logits, batch.teacher_logits)
    gate = torch.sigmoid(2.0 * (1.5 - reverse.detach()))
    assert ((gate > 0.05) & (gate < 0.95))[batch.response_mask].any()
    expected = (gate * reverse + (1 - gate) * forward)[batch.response_mask].mean()
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad, expected_grad)


def test_gated_teacher_rewritten_tokens_always_take_forward_kl():
    algorithm, logits, batch = gated_batch(gate="hard", tau=1e6)  # every token "easy"
    rewritten = torch.zeros_like(batch.response_mask)
    rewritten[:, ::2] = True
    batch = batch.replace(
        token_source=torch.where(rewritten, int(TokenSource.TEACHER), int(TokenSource.STUDENT)).to(
            torch.int8
        )
    )
    loss, metrics = algorithm.loss(StudentLogits(logits), batch)
    reverse = reverse_kl(logits, batch.teacher_logits)
    forward = forward_kl(logits, batch.teacher_logits)
    mask = batch.response_mask
    assert loss.item() == pytest.approx(
        torch.where(rewritten, forward, reverse)[mask].mean().item(), rel=1e-5
    )
    assert metrics["gated/hard_fraction"] == pytest.approx(
        (rewritten & mask).sum().item() / mask.sum().item()
    )


def step_means_loop(values, mask, delimiters):
    out = torch.zeros_like(values)
    for b in range(values.shape[0]):
        steps, current = [], []
        for t in range(values.shape[1]):
            current.append(t)
            if delimiters[b, t]:
                steps.append(current)
                current = []
        steps.append(current)
        for step in steps:
            real = [values[b, t].item() for t in step if mask[b, t]]
            mean = sum(real) / len(real) if real else 0.0
            for t in step:
                out[b, t] = mean
    return out


@pytest.mark.parametrize("seed", range(4))
def test_step_means_match_a_loop(seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(4, 9, generator=generator, dtype=torch.float64)
    mask = torch.arange(9) < torch.tensor([9, 1, 5, 7]).unsqueeze(-1)
    delimiters = torch.rand(4, 9, generator=generator) < 0.3
    actual = step_means(values, mask, delimiters)
    expected = step_means_loop(values, mask, delimiters)
    torch.testing.assert_close(actual[mask], expected[mask])


def test_gated_step_granularity_gates_on_step_means():
    delimiter = 3
    algorithm, logits, batch = gated_batch(
        gate="soft", tau=1.0, granularity="step", step_delimiter_id=delimiter
    )
    ids = batch.response_ids.clone()
    ids[:, 2] = delimiter
    batch = batch.replace(response_ids=ids)
    plan = make_algorithm(
        "gated_dual_kl", {"granularity": "step", "step_delimiter_id": delimiter}
    ).plan(0)
    assert plan.rewrite.step_delimiter_id == delimiter and plan.rewrite.threshold == 1.0
    loss, _ = algorithm.loss(StudentLogits(logits), batch)
    reverse = reverse_kl(logits, batch.teacher_logits)
    forward = forward_kl(logits, batch.teacher_logits)
    distance = step_means_loop(
        reverse.detach().double(), batch.response_mask, ids == delimiter
    ).float()
    gate = torch.sigmoid(5.0 * (1.0 - distance))
    expected = (gate * reverse + (1 - gate) * forward)[batch.response_mask].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gated_support_topk_renormalises_on_the_teacher_top_k():
    k = 4
    algorithm, logits, batch = gated_batch(gate="hard", tau=0.8, support_topk=k)
    loss, _ = algorithm.loss(StudentLogits(logits), batch)
    student, teacher = log_probs(logits), log_probs(batch.teacher_logits)
    ids = teacher.topk(k, -1).indices
    s, t = student.gather(-1, ids), teacher.gather(-1, ids)
    s, t = s - s.logsumexp(-1, keepdim=True), t - t.logsumexp(-1, keepdim=True)
    reverse, forward = kl_from_logprobs(s, t), kl_from_logprobs(t, s)
    expected = torch.where(reverse < 0.8, reverse, forward)[batch.response_mask].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    renormalised = restrict_to_teacher_support(student, teacher, k)
    assert all(torch.allclose(x.exp().sum(-1), torch.ones(())) for x in renormalised)
    # the same support read from a top-k teacher: the tail bucket is not a token
    topk_algorithm = make_algorithm(
        "gated_dual_kl",
        {
            "teacher_output": "topk",
            "topk": k,
            "rewrite": False,
            "gate": "hard",
            "tau": 0.8,
            "support_topk": k,
        },
    )
    for seed in (10, 11):  # inferred and exact tails
        _, full_batch = make_batch(algorithm, seed=seed)
        logits, topk_batch = make_batch(topk_algorithm, seed=seed)
        expected = algorithm.loss(StudentLogits(logits), full_batch)[0].item()
        assert topk_algorithm.loss(StudentLogits(logits), topk_batch)[0].item() == pytest.approx(
            expected, rel=1e-5
        )


def test_gated_clip_kl_caps_the_distance():
    algorithm, logits, batch = gated_batch(gate="soft", tau=1.0, clip_kl=0.5)
    _, metrics = algorithm.loss(StudentLogits(logits), batch)
    reverse = reverse_kl(logits, batch.teacher_logits).clamp_max(0.5)
    assert metrics["gated/distance"] == pytest.approx(
        reverse[batch.response_mask].mean().item(), rel=1e-5
    )


# ---------------------------------------------------------------- RL + distillation


def test_rl_distill_alpha_schedules():
    constant = make_algorithm("rl_distill", {"alpha": 0.3})
    assert [constant.alpha_at(s) for s in (0, 50, 10_000)] == [0.3, 0.3, 0.3]
    for schedule in ("linear", "cosine"):
        algorithm = make_algorithm(
            "rl_distill",
            {"alpha": 0.9, "alpha_end": 0.1, "alpha_schedule": schedule, "schedule_steps": 100},
        )
        assert algorithm.alpha_at(0) == pytest.approx(0.9)
        assert algorithm.alpha_at(50) == pytest.approx(0.5)
        assert algorithm.alpha_at(100) == pytest.approx(0.1)
        assert algorithm.alpha_at(1000) == pytest.approx(0.1)
    linear = make_algorithm(
        "rl_distill",
        {"alpha": 0.9, "alpha_end": 0.1, "alpha_schedule": "linear", "schedule_steps": 100},
    )
    cosine = make_algorithm(
        "rl_distill",
        {"alpha": 0.9, "alpha_end": 0.1, "alpha_schedule": "cosine", "schedule_steps": 100},
    )
    assert linear.alpha_at(25) == pytest.approx(0.9 - 0.8 * 0.25)
    assert cosine.alpha_at(25) == pytest.approx(0.9 - 0.8 * (1 - math.cos(math.pi / 4)) / 2)
    with pytest.raises(AlgorithmConfigError, match="alpha_end"):
        build_algorithm({"name": "rl_distill", "alpha_schedule": "linear"})


def reward_advantages_loop(rewards, group_ids, estimator):
    out = []
    for row in range(len(rewards)):
        group = [r for r in range(len(rewards)) if group_ids[r] == group_ids[row]]
        values = [rewards[r].item() for r in group]
        if estimator == "group":
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            out.append((rewards[row].item() - mean) / (std + 1e-6))
        else:
            others = [rewards[r].item() for r in group if r != row]
            out.append(rewards[row].item() - sum(others) / len(others))
    return out


@pytest.mark.parametrize("estimator", ["group", "rloo"])
def test_rl_distill_group_estimators_match_loops(estimator):
    algorithm = make_algorithm(
        "rl_distill",
        {
            "estimator": estimator,
            "alpha": 0.9,
            "alpha_end": 0.1,
            "alpha_schedule": "linear",
            "schedule_steps": 10,
        },
    )
    _, batch = make_batch(algorithm, seed=12, step=5)
    alpha = 0.5
    out = algorithm.advantages(batch).advantages
    reward_adv = reward_advantages_loop(batch.rewards, batch.group_ids.tolist(), estimator)
    for b in range(batch.size):
        for t in range(TOKENS):
            if not batch.response_mask[b, t]:
                assert out[b, t].item() == 0.0
                continue
            kl = batch.student_logprobs[b, t].item() - batch.teacher_logprobs[b, t].item()
            expected = (1 - alpha) * reward_adv[b] - alpha * kl
            assert out[b, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_rl_distill_reinforce_uses_a_moving_baseline():
    algorithm = make_algorithm(
        "rl_distill",
        {"estimator": "reinforce", "samples_per_prompt": 1, "alpha": 0.0, "baseline_momentum": 0.5},
    )
    baseline = None
    for seed in range(3):
        _, batch = make_batch(algorithm, seed=20 + seed)
        mean = batch.rewards.mean().item()
        used = mean if baseline is None else baseline
        out = algorithm.advantages(batch).advantages
        expected = (batch.rewards - used).unsqueeze(-1).expand_as(out) * batch.response_mask
        torch.testing.assert_close(out, expected)
        baseline = 0.5 * used + 0.5 * mean


def test_rl_distill_needs_rewards_and_groups():
    algorithm = make_algorithm("rl_distill", {})
    _, batch = make_batch(algorithm, seed=13)
    with pytest.raises(ValueError, match="rewards"):
        algorithm.advantages(batch.replace(rewards=None))
    with pytest.raises(ValueError, match="group_ids"):
        algorithm.advantages(batch.replace(group_ids=None))
    assert algorithm.plan(0).samples_per_prompt == algorithm.samples_per_prompt


def test_rl_distill_analytic_adds_alpha_times_jsd():
    algorithm = make_algorithm(
        "rl_distill", {"distill": "analytic", "beta": 0.5, "alpha": 0.4, "teacher_output": "full"}
    )
    logits, batch = make_batch(algorithm, seed=14)
    batch = algorithm.advantages(batch)
    loss, metrics = algorithm.loss(StudentLogits(logits), batch)
    mask = batch.response_mask
    logq = token_logprobs(logits, batch.response_ids)
    pg = clipped_surrogate(logq, batch.student_logprobs, batch.advantages, 0.2)[mask].mean()
    jsd = generalized_jsd(logits, batch.teacher_logits, 0.5)[mask].mean()
    assert loss.item() == pytest.approx((pg + 0.4 * jsd).item(), rel=1e-5)
    assert metrics["rl_distill/divergence"] == pytest.approx(jsd.item(), rel=1e-5)


# ---------------------------------------------------------------- OPD


@pytest.mark.parametrize("gamma", [0.0, 0.7])
def test_opd_advantage_is_negative_log_ratio(gamma):
    algorithm = make_algorithm("opd", {"gamma": gamma, "whiten_advantages": False})
    _, batch = make_batch(algorithm, seed=15)
    out = algorithm.advantages(batch).advantages
    for b in range(batch.size):
        positions = [t for t in range(TOKENS) if batch.response_mask[b, t]]
        per_token = {
            t: -(batch.student_logprobs[b, t].item() - batch.teacher_logprobs[b, t].item())
            for t in positions
        }
        for t in range(TOKENS):
            expected = (
                sum(gamma ** (i - t) * per_token[i] for i in positions if i >= t)
                if t in positions
                else 0.0
            )
            assert out[b, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_opd_whitened_advantages_have_zero_mean_unit_variance():
    raw = make_algorithm("opd", {"whiten_advantages": False})
    _, batch = make_batch(raw, seed=15)
    expected = whiten(raw.advantages(batch).advantages, batch.response_mask)
    out = make_algorithm("opd", {}).advantages(batch).advantages
    torch.testing.assert_close(out, expected)
    values = out[batch.response_mask]
    assert values.mean().abs() < 1e-5 and (values.var(unbiased=False) - 1).abs() < 1e-3


def test_opd_loss_is_importance_weighted_policy_gradient():
    algorithm = make_algorithm("opd", {})
    logits, batch = make_batch(algorithm, seed=16)
    batch = algorithm.advantages(batch)
    loss, metrics = algorithm.loss(StudentLogits(logits), batch)
    (grad,) = torch.autograd.grad(loss, logits)
    mask = batch.response_mask
    logq = token_logprobs(logits, batch.response_ids)
    expected = masked_mean(-(logq - batch.behaviour_logprobs).exp() * batch.advantages, mask)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad, expected_grad)
    kl = (batch.student_logprobs - batch.teacher_logprobs)[mask].mean().item()
    assert metrics["opd/reverse_kl"] == pytest.approx(kl, rel=1e-5)


@pytest.mark.parametrize(
    "name,kwargs", [("minillm", {"teacher_output": "full"}), ("opd", {}), ("sft", {})]
)
def test_losses_keep_float64_and_pass_gradcheck(name, kwargs):
    """token_logprobs must not downcast: a float64 learner gets float64 losses."""
    algorithm = make_algorithm(name, kwargs)
    logits, batch = make_batch(algorithm, seed=17)
    assert token_logprobs(logits.double(), batch.response_ids).dtype == torch.float64
    batch = algorithm.advantages(batch)
    logits = logits.detach().double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: algorithm.loss(StudentLogits(x), batch)[0], (logits,))


def test_padded_vocabularies_are_cut_to_the_shared_ids():
    """A teacher whose embedding is padded wider than the student's: the extra columns are
    dropped and both distributions renormalise over the ids they share."""
    from protege.algorithms.teacher_view import paired_logprobs

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 8)
    _, batch = make_batch(make_algorithm("gkd", {}))
    batch = batch.replace(teacher_logits=teacher)
    s, t = paired_logprobs(student, batch)
    assert s.shape == t.shape == (2, 3, 5)
    assert torch.allclose(t, torch.log_softmax(teacher[..., :5], -1))
    assert torch.allclose(s.exp().sum(-1), torch.ones(2, 3))
    with pytest.raises(ValueError, match="different positions"):
        paired_logprobs(student, batch.replace(teacher_logits=torch.randn(2, 4, 5)))
