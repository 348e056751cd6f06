"""fusion.mode=learned (issue 14): the router's mixture-of-experts loss against brute force,
learning to route two row types, its data-parallel and checkpointed state, the refusals,
and short in-process runs with the two shipped specialists."""

from __future__ import annotations

import json
import math
import os
import threading

import pytest
import torch

from protege.cli import run_example
from protege.config import load_config
from protege.config_text import ConfigError
from protege.data import DataError
from protege.errors import SetupError
from protege.fusion_config import RouterConfig
from protege.router import (
    ROUTER_FILE,
    FusionRouter,
    StepTotals,
    mixture_nll,
    responsibilities,
    reward_weights,
    sequence_logprobs,
)
from protege.run import build_controller

# -- the loss --------------------------------------------------------------------------------


def _brute_force(scores, sequence_logp, rewards):
    """L = −Σ_b w_b log Σ_i α_bi exp(ℓ_bi) / Σ_b w_b and dL/dscores = w_b (α_b − r_b) / Σ w,
    by explicit loops in float64."""
    batch, count = scores.shape
    weights = [min(max(float(r), 0.0), 1.0) for r in rewards]
    total, loss = sum(weights), 0.0
    grad = torch.zeros(batch, count, dtype=torch.float64)
    for b in range(batch):
        exps = [math.exp(float(scores[b, i])) for i in range(count)]
        alpha = [e / sum(exps) for e in exps]
        joint = [alpha[i] * math.exp(float(sequence_logp[b, i])) for i in range(count)]
        loss -= weights[b] * math.log(sum(joint)) / total
        for i in range(count):
            grad[b, i] = weights[b] * (alpha[i] - joint[i] / sum(joint)) / total
    return loss, grad


def test_router_loss_and_gradient_match_the_posterior_responsibilities():
    torch.manual_seed(0)
    scores = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    sequence_logp = -torch.rand(6, 3, dtype=torch.float64) * 8
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 1.0], dtype=torch.float64)
    log_alpha = torch.log_softmax(scores, -1)
    weights = reward_weights(rewards).double()
    loss = (weights * mixture_nll(log_alpha, sequence_logp)).sum() / weights.sum()
    loss.backward()
    expected_loss, expected_grad = _brute_force(scores.detach(), sequence_logp, rewards)
    assert float(loss.detach()) == pytest.approx(expected_loss, rel=1e-12)
    torch.testing.assert_close(scores.grad, expected_grad, rtol=1e-10, atol=1e-12)
    # the gradient is w (α − r): zero for the unrewarded rows 1 and 4
    posterior = responsibilities(log_alpha.detach(), sequence_logp)
    torch.testing.assert_close(
        scores.grad, weights[:, None] * (log_alpha.detach().exp() - posterior) / weights.sum()
    )
    assert scores.grad[[1, 4]].abs().max() == 0
    probe = scores.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: mixture_nll(torch.log_softmax(s, -1), sequence_logp).sum(), (probe,)
    )


def test_sequence_logprobs_sum_the_real_tokens_only():
    logprobs = torch.tensor([[[-1.0, -2.0, -9.0]], [[-0.5, -0.5, -9.0]]])  # [n=2,B=1,T=3]
    mask = torch.tensor([[True, True, False]])
    assert sequence_logprobs(logprobs, mask).tolist() == [[-3.0, -1.0]]


# -- learning to route -----------------------------------------------------------------------
HIDDEN = 4  # the router reads 2·HIDDEN features (mean ⧺ last prompt state)


def _synthetic(generator: torch.Generator, rows: int = 32):
    """Two row types with their own features; teacher t explains the rewarded responses of
    type t (ℓ = −1 vs −6), while the unrewarded ones are explained best by the other teacher
    (what a router trained on closeness to the student's samples would chase)."""
    kind = torch.randint(0, 2, (rows,), generator=generator)
    centres = torch.tensor([[1.0, -1.0] * HIDDEN, [-1.0, 1.0] * HIDDEN])
    features = centres[kind] + 0.5 * torch.randn(rows, 2 * HIDDEN, generator=generator)
    rewards = (torch.rand(rows, generator=generator) < 0.3).float()
    right = torch.nn.functional.one_hot(kind, 2).float()
    good = torch.where(right.bool(), -1.0, -6.0)
    bad = torch.where(right.bool(), -6.0, -1.0)
    sequence_logp = torch.where(rewards.bool()[:, None], good, bad)
    return features, sequence_logp, rewards, kind


def _update(router: FusionRouter, features, sequence_logp, rewards, labels=None) -> dict:
    totals = StepTotals(float(reward_weights(rewards).sum()), float(len(rewards)), 0.0)
    router.begin(totals)
    router.accumulate(features, sequence_logp, rewards, labels)
    return router.finish(lambda flat: flat)


def _agreement(router: FusionRouter, generator: torch.Generator) -> float:
    features, _, _, kind = _synthetic(generator, rows=512)
    with torch.no_grad():
        return float((router.log_weights(features).argmax(-1) == kind).float().mean())


def test_router_learns_to_send_each_row_type_to_its_teacher():
    torch.manual_seed(0)
    router = FusionRouter(HIDDEN, [1.0, 1.0], RouterConfig())
    generator = torch.Generator().manual_seed(1)
    before = _agreement(router, torch.Generator().manual_seed(99))
    for _ in range(300):
        metrics = _update(router, *_synthetic(generator)[:3])
        assert metrics["router/updated"] == 1.0 and math.isfinite(metrics["router/loss"])
    after = _agreement(router, torch.Generator().manual_seed(99))
    assert 0.35 < before < 0.65  # uniform α: argmax is teacher 0 on every row
    assert after > 0.9, (before, after)


def test_a_step_without_a_rewarded_row_leaves_the_router_untouched():
    torch.manual_seed(0)
    router = FusionRouter(HIDDEN, [1.0, 1.0], RouterConfig())
    features, sequence_logp, _, _ = _synthetic(torch.Generator().manual_seed(1))
    _update(router, features, sequence_logp, torch.ones(32))  # one real update first
    before = {k: v.clone() for k, v in router.state_tensors().items()}
    metrics = _update(router, features, sequence_logp, torch.zeros(32))
    assert metrics["router/updated"] == 0.0 and metrics["router/rewarded_rows"] == 0.0
    after = router.state_tensors()
    assert all(torch.equal(before[k], after[k]) for k in before)


class Collective:
    """An all-reduce (sum) between threads, one per simulated data-parallel rank."""

    def __init__(self, ranks: int):
        self.barrier, self.slots = threading.Barrier(ranks), [None] * ranks

    def reducer(self, rank: int):
        def reduce(tensor):
            self.slots[rank] = tensor.detach().clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()
            return total

        return reduce


def test_two_ranks_on_halves_update_the_router_as_one_rank_on_the_whole_batch():
    """The losses' global normalisers, the batch-mean α of the balance term and the gradient
    all-reduced over ranks give exactly the single-rank update."""
    features, sequence_logp, rewards, _ = _synthetic(torch.Generator().manual_seed(3))
    totals = StepTotals(float(reward_weights(rewards).sum()), 32.0, 0.0)
    options = RouterConfig(entropy_bonus=0.1, balance=0.5)
    routers = []
    for _ in range(3):
        torch.manual_seed(0)
        routers.append(FusionRouter(HIDDEN, [1.0, 2.0], options))
    whole, *ranks = routers
    whole.begin(totals)
    whole.accumulate(features, sequence_logp, rewards, None)
    expected = whole.finish(lambda flat: flat)
    collective, results = Collective(2), [None, None]

    def rank(index: int, rows: slice) -> None:
        ranks[index].begin(totals)
        for micro in (slice(rows.start, rows.start + 5), slice(rows.start + 5, rows.stop)):
            ranks[index].accumulate(features[micro], sequence_logp[micro], rewards[micro], None)
        results[index] = ranks[index].finish(collective.reducer(index))

    threads = [
        threading.Thread(target=rank, args=(0, slice(0, 20))),
        threading.Thread(target=rank, args=(1, slice(20, 32))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results[0]["router/batch_entropy"] == pytest.approx(expected["router/batch_entropy"])
    summed = results[0]["router/loss"] + results[1]["router/loss"]
    assert summed == pytest.approx(expected["router/loss"], rel=1e-6)
    for router in ranks:
        for name, value in whole.state_tensors().items():
            torch.testing.assert_close(router.state_tensors()[name], value, rtol=1e-5, atol=1e-7)


def test_saved_router_state_resumes_the_same_updates(tmp_path):
    generator = torch.Generator().manual_seed(4)
    batches = [_synthetic(generator)[:3] for _ in range(4)]
    torch.manual_seed(0)
    original = FusionRouter(HIDDEN, [1.0, 1.0], RouterConfig())
    for batch in batches[:3]:
        _update(original, *batch)
    original.save(tmp_path)
    torch.manual_seed(5)  # another initialisation: everything must come from the file
    resumed = FusionRouter(HIDDEN, [1.0, 1.0], RouterConfig())
    resumed.load(tmp_path)
    probe = batches[3][0]
    torch.testing.assert_close(resumed.log_weights(probe), original.log_weights(probe))
    _update(original, *batches[3])
    _update(resumed, *batches[3])  # the same Adam moments and step count: the same update
    for name, value in original.state_tensors().items():
        assert torch.equal(resumed.state_tensors()[name], value), name


# -- runs ------------------------------------------------------------------------------------


def _config(tmp_path, *overrides: str, out: str = "run"):
    return load_config(
        "multi_teacher",
        [
            "trainer.workers=local",
            "logging.wandb=disabled",
            "logging.progress=false",
            "fusion.mode=learned",
            "data.test=null",
            "trainer.batch_size=8",
            "trainer.steps=2",
            f"output_dir={tmp_path / out}",
            *overrides,
        ],
    )


def _steps(config) -> list[dict]:
    with open(f"{config.output_dir}/metrics.jsonl") as lines:
        rows = [json.loads(line) for line in lines]
    return [row for row in rows if "learner/loss" in row]


def test_learned_fusion_without_a_reward_exits_2_naming_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_example(
            "multi_teacher",
            ["fusion.mode=learned", "reward.rules=[]", f"output_dir={tmp_path / 'run'}"],
        )
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "fusion.mode=learned" in err and "reward.rules" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written or loaded


@pytest.mark.parametrize(
    ("preset", "match"),
    [
        ("minillm", "teacher-steered decoding"),  # mix_alpha samples from one teacher
        ("opd", "computes its advantages at the controller"),
    ],
)
def test_learned_fusion_is_refused_where_the_router_cannot_act(tmp_path, preset, match):
    config = load_config(
        preset,
        [
            "teachers.0.name=low",
            "teachers.0.model=builtin:tiny/multi_teacher/low",
            "teachers.1.name=high",
            "teachers.1.model=builtin:tiny/multi_teacher/high",
            "fusion.mode=learned",
            "reward.rules=[{name: exact_match}]",
            "trainer.workers=local",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    with pytest.raises(SetupError, match=match):
        build_controller(config)


def test_a_label_naming_an_unknown_teacher_is_an_error(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": "1+2=", "completion": "3<eos>", "answer": "3", "teacher": "lo"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="teacher='lo' is not one of the teachers"):
        build_controller(_config(tmp_path, f"data.train={path}"))


def test_learned_run_reports_finite_router_metrics_that_follow_alpha(tmp_path):
    config = _config(tmp_path, "trainer.steps=3")
    build_controller(config).run()
    steps = _steps(config)
    assert len(steps) == 3
    for row in steps:
        for key in ("router/loss", "router/entropy", "router/agreement"):
            assert math.isfinite(row[key]), key
        assert 0 <= row["router/entropy"] <= math.log(2) + 1e-6
        assert row["teacher/low/share"] + row["teacher/high/share"] == pytest.approx(1.0)
    # α starts uniform (zero-initialised last layer), and moves once the router updates
    assert steps[0]["teacher/low/share"] == pytest.approx(0.5, abs=1e-6)
    assert steps[0]["router/entropy"] == pytest.approx(math.log(2), abs=1e-6)
    if any(row["router/updated"] for row in steps[:-1]):
        assert steps[-1]["teacher/low/share"] != pytest.approx(0.5, abs=1e-6)


def test_a_resumed_learned_run_restores_the_router(tmp_path):
    """Stopped after a checkpoint at step 2 and resumed, step 3 sees the same α (teacher
    shares, router loss) as the uninterrupted run: the router and its optimizer came back.
    (A constant lr: the preset's cosine schedule depends on trainer.steps.)"""
    same = ("trainer.save_every=2", "learner.lr_schedule=constant")
    whole = _config(tmp_path, "trainer.steps=3", *same, out="whole")
    build_controller(whole).run()
    first = _config(tmp_path, "trainer.steps=2", *same, out="resumed")
    build_controller(first).run()
    assert (tmp_path / "resumed" / "checkpoints").exists()
    assert list((tmp_path / "resumed" / "checkpoints").rglob(ROUTER_FILE))
    build_controller(
        _config(tmp_path, "trainer.steps=3", "trainer.resume=true", *same, out="resumed")
    ).run()
    expected, got = _steps(whole)[-1], _steps(first)[-1]
    assert got["learner/version"] == 3.0
    for key in ("teacher/low/share", "router/loss", "router/entropy", "learner/loss"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key


def test_router_options_are_strict(tmp_path):
    with pytest.raises(ConfigError, match="fusion.router.lrr"):
        _config(tmp_path, "fusion.router.lrr=0.1")
    with pytest.raises(ConfigError, match="fusion.router.features"):
        _config(tmp_path, "fusion.router.features=teacher")


@pytest.mark.slow
def test_learned_router_finds_the_split_and_the_student_learns(tmp_path):
    """150 steps of the preset with fusion.mode=learned: the router's argmax matches the rows'
    (unread) teacher field on most rows, and the student gains accuracy."""
    config = _config(
        tmp_path,
        "trainer.steps=150",
        "trainer.batch_size=32",
        "data.test=builtin:tiny/test",
        "trainer.eval_size=100",
    )
    result = build_controller(config).run()
    steps = _steps(config)
    late = [row["router/agreement"] for row in steps[-20:]]
    assert sum(late) / len(late) > 0.8, late
    assert result["eval_after/accuracy"] >= result["eval_before/accuracy"] + 0.1, result


@pytest.mark.slow  # a local Ray cluster: two data-parallel learners all-reduce the router
def test_learned_run_over_ray_with_two_learners(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "RAY_ADDRESS": "local"}
    command = [
        sys.executable,
        str(root / "examples" / "multi_teacher.py"),
        "fusion.mode=learned",
        "learner.num_workers=2",
        "trainer.steps=3",
        "trainer.batch_size=8",
        "trainer.eval_size=8",
        "logging.wandb=disabled",
        f"output_dir={out}",
    ]
    done = subprocess.run(
        command, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "learner/loss" in row]
    assert [row["learner/version"] for row in steps] == [1.0, 2.0, 3.0]
    for row in steps:
        assert math.isfinite(row["router/loss"]) and row["router/updated"] in (0.0, 1.0)
        assert row["teacher/low/share"] + row["teacher/high/share"] == pytest.approx(1.0)
