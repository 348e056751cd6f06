"""Multi-teacher fusion (issue 14): the fused target against brute-force float64 mixtures,
top-k merging on the union of supports, routing, and every divergence on the fused target."""

from __future__ import annotations

import inspect
import math
import pickle

import pytest
import torch

from protege.algorithms import divergences as D
from protege.fusion import (
    confidence_weights,
    entropy,
    fixed_weights,
    fuse_batch,
    fuse_full,
    fuse_topk,
    route_weights,
    teacher_metrics,
)
from protege.fusion_config import FusionConfig
from protege.records import RolloutBatch, concat
from protege.teacher_payload import TeacherPayload

B, T, V = 3, 4, 11


def _logits(seed: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, B, T, V, generator=torch.Generator().manual_seed(seed)) * 2.0


def _brute_mixture(logits: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B,T,V] float64 Σ_i w_i softmax(z_i/τ), token by token."""
    out = torch.zeros(B, T, V, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for i in range(logits.shape[0]):
                p = torch.softmax(logits[i, b, t].double() / temperature, -1)
                out[b, t] += weights[i, b, t].double() * p
    return out


def _topk_payload(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    logp = torch.log_softmax(logits, -1)
    values, ids = logp.topk(k, -1)
    if k == V:
        tail = torch.full(logp.shape[:-1], -math.inf)
    else:
        tail = logp.scatter(-1, ids, -math.inf).logsumexp(-1)
    return ids, values, tail


def _batch(**fields) -> RolloutBatch:
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -1] = False
    return RolloutBatch(
        prompt_ids=torch.zeros(B, 2, dtype=torch.long),
        prompt_mask=torch.ones(B, 2, dtype=torch.bool),
        response_ids=torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5)),
        response_mask=mask,
        **fields,
    )


def _named(logits: torch.Tensor, k: int | None = None) -> dict[str, TeacherPayload]:
    named = {}
    for i, name in enumerate(["low", "high", "third"][: logits.shape[0]]):
        logp = torch.log_softmax(logits[i], -1)
        sampled = logp.gather(-1, _batch().response_ids.unsqueeze(-1)).squeeze(-1)
        if k is None:
            named[name] = TeacherPayload(logprobs=sampled, logits=logits[i])
        else:
            ids, values, tail = _topk_payload(logits[i], k)
            named[name] = TeacherPayload(
                logprobs=sampled, topk_ids=ids, topk_logprobs=values, tail_logprobs=tail
            )
    return named


# -- weights -----------------------------------------------------------------------------


def test_fixed_weights_are_normalised():
    w = fixed_weights([1.0, 3.0], torch.Size([B, T]))
    assert w.shape == (2, B, T)
    torch.testing.assert_close(w[:, 1, 2], torch.tensor([0.25, 0.75]))


def test_route_weights_are_one_hot_per_row():
    w = route_weights(torch.tensor([1, 0, 1]), 2, T)
    assert w[:, 0].tolist() == [[0.0] * T, [1.0] * T]
    assert w[:, 1].tolist() == [[1.0] * T, [0.0] * T]


def test_confidence_weights_favour_the_surer_teacher_by_the_formula():
    logits = _logits(1)
    logits[0] *= 4.0  # teacher 0 is far more peaked
    H = torch.stack([entropy(torch.log_softmax(z, -1)) for z in logits])
    w = confidence_weights(H, [1.0, 2.0], temperature=0.5)
    expected = torch.softmax(
        torch.stack([math.log(1.0) - H[0] / 0.5, math.log(2.0) - H[1] / 0.5]), 0
    )
    torch.testing.assert_close(w, expected)
    assert (w[0] > w[1])[H[0] + 0.5 * math.log(2) < H[1]].all()
    # equal entropies: the prior weights; weight 0: no share at all
    same = confidence_weights(torch.stack([H[1], H[1]]), [1.0, 3.0], 1.0)
    torch.testing.assert_close(same[1], torch.full((B, T), 0.75))
    assert (confidence_weights(H, [0.0, 1.0], 1.0)[0] == 0).all()


def test_entropy_matches_its_definition_and_ignores_zero_mass():
    logp = torch.log(torch.tensor([0.5, 0.5, 0.0]))
    assert entropy(logp).item() == pytest.approx(math.log(2))


# -- full logits -------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_full_logits_are_the_mixture_of_tempered_teachers(temperature):
    logits = _logits(2)
    w = torch.rand(2, B, T, generator=torch.Generator().manual_seed(3))
    w = w / w.sum(0)
    fused = fuse_full(logits, w, temperature)
    got = torch.softmax(fused.double() / temperature, -1)  # what a loss at τ reads
    torch.testing.assert_close(got, _brute_mixture(logits, w, temperature), atol=1e-6, rtol=0)


# -- top-k on the union of supports -----------------------------------------------------


def test_topk_fusion_with_k_equal_to_v_is_the_full_fusion():
    logits = _logits(4)
    w = fixed_weights([1.0, 2.0], torch.Size([B, T]))
    ids, logps, tails = (torch.stack(x) for x in zip(*(_topk_payload(z, V) for z in logits)))
    fused_ids, fused_logp, fused_tail = fuse_topk(ids, logps, tails, w, V)
    assert fused_ids.shape == (B, T, V) and (fused_tail == -math.inf).all()
    dense = torch.zeros(B, T, V, dtype=torch.float64).scatter(
        -1, fused_ids, fused_logp.double().exp()
    )
    torch.testing.assert_close(dense, _brute_mixture(logits, w, 1.0), atol=1e-6, rtol=0)


def test_topk_fusion_is_exact_when_the_teachers_tails_are_uniform():
    """A teacher whose mass outside its top-k is uniform is what the merge assumes of an id
    off its list: then every fused entry and the fused tail equal the brute-force mixture."""
    k = 3
    probs = []
    for seed in (6, 7):
        top = torch.rand(B, T, k, generator=torch.Generator().manual_seed(seed)) + 1.0
        tail_each = torch.rand(B, T, 1, generator=torch.Generator().manual_seed(seed + 9)) * 0.1
        scores = tail_each.expand(B, T, V).clone()
        order = torch.stack(
            [
                torch.randperm(V, generator=torch.Generator().manual_seed(seed + b * T + t))
                for b in range(B)
                for t in range(T)
            ]
        ).view(B, T, V)
        scores.scatter_(-1, order[..., :k], top)
        probs.append(scores / scores.sum(-1, keepdim=True))
    logits = torch.stack(probs).log()
    w = fixed_weights([1.0, 1.0], torch.Size([B, T]))
    ids, logps, tails = (torch.stack(x) for x in zip(*(_topk_payload(z, k) for z in logits)))
    fused_ids, fused_logp, fused_tail = fuse_topk(ids, logps, tails, w, V)
    truth = _brute_mixture(logits, w, 1.0)
    torch.testing.assert_close(
        fused_logp.double().exp(), truth.gather(-1, fused_ids), atol=1e-6, rtol=0
    )
    outside = truth.scatter(-1, fused_ids, 0.0).sum(-1)
    torch.testing.assert_close(fused_tail.double().exp(), outside, atol=1e-6, rtol=0)
    union = torch.zeros(B, T, V, dtype=torch.bool)
    for i in range(2):
        union.scatter_(-1, ids[i], True)
    chosen = torch.zeros_like(union).scatter(-1, fused_ids, True)
    assert (chosen >= union).all(), "every id of every teacher's top-k is kept"


def test_topk_fusion_keeps_every_listed_mass_exactly_and_sums_to_one():
    logits = _logits(8)
    k = 4
    w = fixed_weights([2.0, 1.0], torch.Size([B, T]))
    ids, logps, tails = (torch.stack(x) for x in zip(*(_topk_payload(z, k) for z in logits)))
    fused_ids, fused_logp, fused_tail = fuse_topk(ids, logps, tails, w, V)
    total = fused_logp.double().exp().sum(-1) + fused_tail.double().exp()
    torch.testing.assert_close(total, torch.ones(B, T, dtype=torch.float64), atol=1e-6, rtol=0)
    truth = _brute_mixture(logits, w, 1.0)
    both = torch.zeros(B, T, V, dtype=torch.bool)  # ids in both teachers' top-k: exact
    both.scatter_(-1, ids[0], True)
    both &= torch.zeros_like(both).scatter(-1, ids[1], True)
    dense = torch.zeros(B, T, V, dtype=torch.float64).scatter(
        -1, fused_ids, fused_logp.double().exp()
    )
    torch.testing.assert_close(dense[both], truth[both], atol=1e-6, rtol=0)


# -- route -------------------------------------------------------------------------------


def test_route_with_topk_k_equal_v_equals_route_with_full_logits():
    logits = _logits(9)
    route = torch.tensor([1, 0, 1])
    fusion = FusionConfig(mode="route")
    weights = {"low": 1.0, "high": 1.0}
    full, _, _ = fuse_batch(
        _batch(named_teachers=_named(logits), teacher_route=route), fusion, weights, 1.0, V
    )
    topk, _, _ = fuse_batch(
        _batch(named_teachers=_named(logits, V), teacher_route=route), fusion, weights, 1.0, V
    )
    dense = torch.full((B, T, V), -math.inf).scatter(
        -1, topk.teacher_topk_ids, topk.teacher_topk_logprobs
    )
    torch.testing.assert_close(dense, torch.log_softmax(full.teacher_logits, -1), atol=1e-6, rtol=0)
    for b, i in enumerate(route.tolist()):  # each row is its teacher's, exactly
        torch.testing.assert_close(
            full.teacher_logits[b].log_softmax(-1), logits[i, b].log_softmax(-1)
        )
    assert not full.named_teachers and not topk.named_teachers
    sampled = _named(logits)
    for b, i in enumerate(route.tolist()):
        name = ["low", "high"][i]
        kept = full.response_mask[b]
        assert torch.equal(full.teacher_logprobs[b][kept], sampled[name].logprobs[b][kept])


def test_route_without_rows_naming_a_teacher_is_a_clear_error():
    from protege.errors import SetupError

    with pytest.raises(SetupError, match="names its teacher in the field 'teacher'"):
        fuse_batch(
            _batch(named_teachers=_named(_logits(1))),
            FusionConfig(mode="route"),
            {"low": 1, "high": 1},
            1.0,
            V,
        )


# -- every divergence on the fused target -------------------------------------------------

DIVERGENCES = {
    "forward_kl": lambda s, t: D.forward_kl(s, t),
    "reverse_kl": lambda s, t: D.reverse_kl(s, t),
    "jsd_0.3": lambda s, t: D.generalized_jsd(s, t, 0.3),
    "jsd_beta0": lambda s, t: D.generalized_jsd(s, t, 0.0),
    "jsd_beta1": lambda s, t: D.generalized_jsd(s, t, 1.0),
    "kl_from_logprobs": lambda s, t: D.kl_from_logprobs(D.log_probs(t), D.log_probs(s)),
    "jsd_from_logprobs": lambda s, t: D.jsd_from_logprobs(D.log_probs(s), D.log_probs(t), 0.7),
    "skew_forward_kl": lambda s, t: D.skew_forward_kl(D.log_probs(s), D.log_probs(t), 0.1),
    "skew_reverse_kl": lambda s, t: D.skew_reverse_kl(D.log_probs(s), D.log_probs(t), 0.1),
    "topk_generalized_jsd_k_eq_v": lambda s, t: D.topk_generalized_jsd(
        s, *reversed(D.log_probs(t).topk(V, -1)), 0.5
    ),
}


@pytest.mark.parametrize("mode", ["fixed", "confidence"])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_every_divergence_runs_on_the_fused_target(name, mode):
    """Each divergence on the fused teacher_logits equals it on the brute-force mixture, and
    its gradient reaches the student."""
    logits = _logits(11)
    fused, mix, _ = fuse_batch(
        _batch(named_teachers=_named(logits)),
        FusionConfig(mode=mode),
        {"low": 1.0, "high": 3.0},
        1.0,
        V,
    )
    student = torch.randn(B, T, V, generator=torch.Generator().manual_seed(12), requires_grad=True)
    value = DIVERGENCES[name](student, fused.teacher_logits)
    truth = _brute_mixture(logits, mix, 1.0).log().float()
    torch.testing.assert_close(value, DIVERGENCES[name](student, truth), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(value).all()
    value.sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_every_divergence_function_of_the_module_is_covered():
    public = {
        n
        for n, f in vars(D).items()
        if not n.startswith("_") and inspect.isfunction(f) and f.__module__ == D.__name__
    }
    used = {
        "forward_kl",
        "reverse_kl",
        "generalized_jsd",
        "kl_from_logprobs",
        "jsd_from_logprobs",
        "skew_forward_kl",
        "skew_reverse_kl",
        "topk_generalized_jsd",
    }
    # helpers, and the sampled estimator (test_sampled_estimators_run_on_the_fused_logprobs)
    not_divergences = {
        "log_probs",
        "masked_sum",
        "masked_mean",
        "topk_buckets",
        "sampled_reverse_kl",
    }
    assert public - not_divergences <= used, public - not_divergences - used


def test_sampled_estimators_run_on_the_fused_logprobs():
    logits = _logits(13)
    fused, mix, _ = fuse_batch(
        _batch(named_teachers=_named(logits)), FusionConfig(), {"low": 1.0, "high": 1.0}, 1.0, V
    )
    truth = (
        _brute_mixture(logits, mix, 1.0)
        .log()
        .gather(-1, fused.response_ids.unsqueeze(-1))
        .squeeze(-1)
    )
    mask = fused.response_mask
    torch.testing.assert_close(
        fused.teacher_logprobs[mask].double(), truth[mask], atol=1e-6, rtol=0
    )
    for kind in ("k1", "k2", "k3"):
        assert torch.isfinite(
            D.sampled_reverse_kl(fused.teacher_logprobs, fused.teacher_logprobs, kind)
        ).all()


# -- per-teacher metrics ----------------------------------------------------------------


def test_teacher_metrics_are_the_kl_to_each_teacher_and_its_share():
    logits = _logits(14)
    batch = _batch(named_teachers=_named(logits), teacher_route=torch.tensor([0, 1, 1]))
    fused, mix, payloads = fuse_batch(
        batch, FusionConfig(mode="route"), {"low": 1.0, "high": 1.0}, 1.0, V
    )
    student = torch.randn(B, T, V, generator=torch.Generator().manual_seed(15))
    metrics = teacher_metrics(student, fused, ["low", "high"], payloads, mix, 1.0)
    mask = fused.response_mask
    for i, name in enumerate(["low", "high"]):
        kl = D.reverse_kl(student, logits[i])
        assert metrics[f"teacher/{name}/reverse_kl"] == pytest.approx(
            float(kl[mask].sum() / mask.sum()), rel=1e-5
        )
    assert metrics["teacher/low/share"] == pytest.approx(3 / 11)  # row 0 has 3 real tokens
    assert metrics["teacher/high/share"] == pytest.approx(8 / 11)


# -- records ------------------------------------------------------------------------------


def test_named_payloads_survive_the_wire_selection_and_concatenation():
    batch = _batch(named_teachers=_named(_logits(16), 4), teacher_route=torch.tensor([0, 1, 0]))
    again = pickle.loads(pickle.dumps(batch))
    assert list(again.named_teachers) == ["low", "high"]
    for name, payload in batch.named_teachers.items():
        for field, value in payload.tensors().items():
            assert torch.equal(getattr(again.named_teachers[name], field), value)
    assert torch.equal(again.teacher_route, batch.teacher_route)
    row = batch.select([2])
    assert torch.equal(
        row.named_teachers["high"].topk_ids, batch.named_teachers["high"].topk_ids[2:]
    )
    joined = concat(batch.split(2))
    assert torch.equal(
        joined.named_teachers["low"].tail_logprobs, batch.named_teachers["low"].tail_logprobs
    )


def test_pending_rollouts_of_several_teachers_survive_a_checkpoint(tmp_path):
    from protege.records import PromptBatch
    from protege.rollout_files import load_rollouts, save_rollouts
    from protege.rollouts import Submitted

    batch = _batch(named_teachers=_named(_logits(17), 4), teacher_route=torch.tensor([1, 0, 0]))
    prompts = PromptBatch(prompt_ids=batch.prompt_ids, prompt_mask=batch.prompt_mask)
    save_rollouts(tmp_path, {3: Submitted(prompts, [batch])})
    (loaded,) = load_rollouts(tmp_path)[3].shards
    assert list(loaded.named_teachers) == ["low", "high"]
    for name, payload in batch.named_teachers.items():
        for field, value in payload.tensors().items():
            assert torch.equal(getattr(loaded.named_teachers[name], field), value)


def test_hidden_state_teachers_are_decoded_each_with_its_own_head_before_fusion():
    heads = {"low": torch.randn(V, 5), "high": torch.randn(V, 5)}
    hidden = torch.randn(2, B, T, 5, generator=torch.Generator().manual_seed(18))
    named = {
        name: TeacherPayload(logprobs=torch.zeros(B, T), hidden=hidden[i])
        for i, name in enumerate(heads)
    }
    seen = []

    def decode(name, states, mask):
        seen.append(name)
        return states @ heads[name].t()

    batch = _batch(named_teachers=named)
    fused, mix, _ = fuse_batch(batch, FusionConfig(), {"low": 1.0, "high": 1.0}, 1.0, V, decode)
    assert seen == ["low", "high"] and fused.teacher_hidden is None
    logits = torch.stack([hidden[i] @ heads[n].t() for i, n in enumerate(heads)])
    truth = _brute_mixture(logits, mix, 1.0)
    torch.testing.assert_close(
        torch.softmax(fused.teacher_logits.double(), -1), truth, atol=1e-6, rtol=0
    )
