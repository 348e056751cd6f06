"""Chunked per-token losses (protege.chunked): every algorithm's loss, metrics
and gradients are those of the whole micro-batch, and far fewer bytes wait for the backward.

Positions are independent in every divergence, so chunked values are compared bitwise
(torch.equal) with the one-block evaluation, which is the unchunked code path itself.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from protege.actors.learner import Learner
from protege.actors.teacher import teacher_outputs
from protege.algorithms.divergences import jsd_from_logprobs, log_probs
from protege.algorithms.gkd import GKD, SFT
from protege.algorithms.minillm import MiniLLM
from protege.algorithms.policy_gradient import token_logprobs
from protege.algorithms.teacher_view import paired_logprobs, paired_per_token
from protege.chunked import LOSS_CHUNK_ELEMENTS, blocks, chunk_tokens_for, per_token
from protege.modeling import load_model
from protege.records import RolloutBatch, RolloutPlan
from protege.student import StudentForward, StudentLogits
from tests.test_algorithms import ALL_VARIANTS, make_algorithm
from tests.test_algorithms import make_batch as algorithm_batch
from tests.test_learner import make_batch as learner_batch
from tests.test_learner import make_config

CHUNKS = [1, 4, 13]  # one token; 4 does not divide 6 tokens; 13 = 2 rows of 6 (of 3 or 12)


def loss_and_grads(algorithm, logits, batch, chunk_tokens):
    logits = logits.detach().clone().requires_grad_(True)
    loss, metrics = algorithm.loss(StudentLogits(logits, chunk_tokens=chunk_tokens), batch)
    loss.backward()
    return loss.detach(), metrics, logits.grad


@pytest.mark.parametrize("name,kwargs", ALL_VARIANTS)
def test_every_algorithm_chunked_equals_whole(name, kwargs):
    """Every registered algorithm × teacher payload (top-k with and without the exact tail,
    K = V, full logits), padded rows, temperatures ≠ 1: same loss, metrics and gradient."""
    algorithm = make_algorithm(name, kwargs)
    for seed in (0, 1):  # seed 1: the scorer's exact tail, seed 0: the tail from the top-k mass
        logits, batch = algorithm_batch(algorithm, seed=seed)
        batch = algorithm.advantages(batch)
        whole = loss_and_grads(algorithm, logits, batch, chunk_tokens=0)
        for chunk in CHUNKS:
            loss, metrics, grad = loss_and_grads(algorithm, logits, batch, chunk)
            assert torch.equal(loss, whole[0]), (chunk, loss, whole[0])
            assert metrics == whole[1], chunk
            # Bitwise for a single per-token term; where a loss reads the logits twice
            # (MiniLLM, rl_distill: log q(y) and a divergence) the two gradients add up in
            # another order than in one graph: equal to float rounding.
            torch.testing.assert_close(grad, whole[2], rtol=1e-6, atol=1e-9, msg=str(chunk))


def _pair(rows=3, tokens=7, vocab=40, teacher_vocab=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(rows, tokens + 1, vocab, generator=g)  # [B,T+1,V] as a model's
    teacher = 2 * torch.randn(rows, tokens, teacher_vocab or vocab, generator=g)
    mask = torch.arange(tokens) < torch.tensor([tokens, 3, 1][:rows]).unsqueeze(-1)
    ids = torch.randint(0, vocab, (rows, tokens), generator=g).masked_fill(~mask, 0)
    batch = RolloutBatch(
        prompt_ids=torch.ones(rows, 1, dtype=torch.long),
        prompt_mask=torch.ones(rows, 1, dtype=torch.bool),
        response_ids=ids,
        response_mask=mask,
        teacher_logits=teacher,
    )
    return student.requires_grad_(True), batch


def _grads_of(fn, inputs):
    """fn's values and the gradients of a weighted sum of them w.r.t. every grad input."""
    values = fn()
    outputs = values if isinstance(values, tuple) else (values,)
    weights = [torch.linspace(-1, 2, v.numel()).reshape(v.shape) for v in outputs]
    total = sum((torch.where(torch.isfinite(v), v, 0) * w).sum() for v, w in zip(outputs, weights))
    grads = torch.autograd.grad(total, inputs)
    return [v.detach() for v in outputs], grads


@pytest.mark.parametrize("teacher_vocab", [40, 43])  # 43: a wider padded embedding, cut
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_full_logits_paths_and_views(teacher_vocab, beta):
    """Shared-vocabulary cut, −inf teacher logits, a non-contiguous [:, :-1] view of the
    model's logits, τ = 0.7: values and gradients equal the unchunked ones for any block."""
    student, batch = _pair(teacher_vocab=teacher_vocab)
    teacher = batch.teacher_logits.clone()
    teacher[0, 0, :5] = -math.inf  # the teacher rules tokens out entirely
    batch = batch.replace(teacher_logits=teacher)
    jsd = functools.partial(jsd_from_logprobs, beta=beta)

    def run(chunk):
        view = StudentLogits(student[:, :-1], chunk_tokens=chunk)
        return _grads_of(lambda: paired_per_token(view, batch, jsd, 0.7), [student])

    (whole,), (whole_grad,) = run(0)
    reference = jsd(*paired_logprobs(student[:, :-1], batch, 0.7))  # main's code, one call
    assert torch.equal(whole, reference.detach())
    for chunk in (1, 2, 5, 8, 15):
        (values,), (grad,) = run(chunk)
        assert torch.equal(values, whole), chunk
        # β = 1 at the teacher's −inf entries: the KL is inf, its gradient NaN, in both
        torch.testing.assert_close(grad, whole_grad, rtol=0, atol=0, equal_nan=True)


def test_gradient_reaches_a_trainable_teacher_side():
    """A teacher target that requires grad (a learned fusion router's) gets its gradient
    through the chunks too, equal to the unchunked one."""
    student, batch = _pair()
    teacher = batch.teacher_logits.clone().requires_grad_(True)
    batch = batch.replace(teacher_logits=teacher)
    jsd = functools.partial(jsd_from_logprobs, beta=0.5)

    def run(chunk):
        view = StudentLogits(student[:, :-1], chunk_tokens=chunk)
        return _grads_of(lambda: paired_per_token(view, batch, jsd), [student, teacher])

    whole_values, whole_grads = run(0)
    values, grads = run(3)
    assert torch.equal(values[0], whole_values[0])
    assert all(torch.equal(a, b) for a, b in zip(grads, whole_grads))
    assert grads[1].abs().sum() > 0


def test_bf16_logits_and_several_outputs():
    """bf16 logits are upcast per block (no float32 copy of the whole); a function with two
    outputs (gated dual-KL's reverse and forward KL) returns both, each exact."""
    student, batch = _pair()
    student = student.detach().bfloat16().requires_grad_(True)

    def both(s, t):
        s_logp, t_logp = log_probs(s), log_probs(t)
        return jsd_from_logprobs(s_logp, t_logp, 1.0), jsd_from_logprobs(s_logp, t_logp, 0.0)

    def run(chunk):
        view = StudentLogits(student[:, :-1], chunk_tokens=chunk)
        return _grads_of(lambda: paired_per_token(view, batch, both), [student])

    whole_values, (whole_grad,) = run(0)
    values, (grad,) = run(4)
    assert len(values) == 2 and values[0].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(values, whole_values))
    assert grad.dtype == torch.bfloat16 and torch.equal(grad, whole_grad)


def test_token_logprobs_without_a_log_softmax_copy_matches_it():
    """gather − logsumexp equals log_softmax(z/τ)[y] (to float rounding) and its gradient."""
    student, batch = _pair(vocab=300)
    logits = student[:, :-1]
    for temperature in (1.0, 0.6):
        ours = token_logprobs(logits, batch.response_ids, temperature)
        brute = log_probs(logits.double(), temperature)
        brute = brute.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(ours.double(), brute, rtol=0, atol=2e-6)
        (grad,) = torch.autograd.grad(ours.sum(), student)
        (brute_grad,) = torch.autograd.grad(brute.sum(), student)
        torch.testing.assert_close(grad, brute_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows,tokens,chunk", [(3, 7, 1), (3, 7, 5), (3, 7, 14), (4, 6, 15)])
def test_blocks_cover_every_position_once(rows, tokens, chunk):
    seen = torch.zeros(rows, tokens, dtype=torch.long)
    for cut in blocks(rows, tokens, chunk):
        assert seen[cut].numel() <= chunk
        seen[cut] += 1
    assert torch.equal(seen, torch.ones_like(seen))
    assert blocks(rows, tokens, 0) == blocks(rows, tokens, rows * tokens) == [(slice(None),) * 2]


def test_auto_keeps_the_tiny_task_in_one_block():
    """The tiny task (vocabulary ~30, 64 rows × ~20 tokens) runs as one block: no
    recomputation, main's code path; a 49k vocabulary gets blocks of 85 positions."""
    assert len(blocks(64, 24, chunk_tokens_for("auto", 30))) == 1
    assert chunk_tokens_for("auto", 49_152) == LOSS_CHUNK_ELEMENTS // 49_152 == 85
    assert chunk_tokens_for(0, 49_152) == 0 and chunk_tokens_for(7, 49_152) == 7


def test_positions_that_disagree_are_named():
    with pytest.raises(ValueError, match="cover different positions"):
        per_token(lambda a, b: a.sum(-1), (torch.zeros(2, 3, 4), torch.zeros(2, 4, 4)), 1)


def _held_bytes(fn, inputs) -> int:
    """Bytes autograd keeps alive for the backward after fn() beyond the inputs' own
    storages (alive anyway): distinct storages, each counted once."""
    known = {x.untyped_storage().data_ptr() for x in inputs if x is not None}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in known:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("payload", ["full", "topk"])
def test_chunking_keeps_no_vocabulary_copies_for_the_backward(payload, beta):
    """On [3,64,4096] GKD: unchunked, autograd keeps [B,T,V] float32 copies for the
    backward (the log-softmax output, the divergence's gradient terms); chunked, only [B,T]
    tensors beside the inputs (the logits, the teacher's payload), whatever the payload and β."""
    student, batch = _pair(rows=3, tokens=64, vocab=4096)
    if payload == "topk":
        values, ids = log_probs(batch.teacher_logits).topk(16, dim=-1)
        batch = batch.replace(
            teacher_logits=None, teacher_topk_ids=ids, teacher_topk_logprobs=values
        )
    algorithm = GKD(beta=beta, teacher_output=payload)
    copy = batch.response_mask.numel() * 4096 * 4  # bytes of one [B,T,V] float32 tensor
    inputs = (student, batch.teacher_logits, batch.teacher_topk_ids, batch.teacher_topk_logprobs)

    def held(chunk):
        view = StudentLogits(student[:, :-1], chunk_tokens=chunk)
        return _held_bytes(lambda: algorithm.loss(view, batch), inputs)

    whole, chunked = held(0), held(32)
    assert whole >= copy
    assert chunked <= 16 * 1024  # a few [B,T] tensors, nothing [B,T,V]


@pytest.mark.parametrize("plan", ["full", "topk"])
def test_model_parameter_gradients_equal(tiny_dirs, plan):
    """Through a tiny model (StudentForward: logits_to_keep, the [:, -(T+1):-1] view),
    GKD, SFT and MiniLLM's single-step term give bitwise the same parameter gradients."""
    model = load_model(tiny_dirs["student"])
    batch = learner_batch(tiny_dirs, rows=4, plan=RolloutPlan(teacher_need=plan, topk=5))
    batch = batch.replace(
        student_logprobs=torch.zeros_like(batch.teacher_logprobs),
        advantages=torch.randn(batch.response_mask.shape, generator=torch.Generator()),
        importance_weights=batch.response_mask.float(),
    )
    for algorithm in (GKD(beta=0.4, teacher_output=plan, temperature=1.3), SFT(), MiniLLM()):
        grads = []
        for chunk in (0, 3):
            model.zero_grad()
            loss, _ = algorithm.loss(StudentForward(model, batch, chunk_tokens=chunk), batch)
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        for name, grad in grads[0].items():
            assert torch.equal(grad, grads[1][name]), (type(algorithm).__name__, name)


def test_fifteen_gkd_steps_are_identical(tiny_dirs):
    """Learner over 15 GKD steps (full logits, JSD(0.5)): the loss and the weights with
    blocks of 5 positions equal those of the unchunked loss exactly."""
    runs = []
    for chunk in (0, 5):
        config = make_config(tiny_dirs, loss_chunk_tokens=chunk)
        learner = Learner(config)
        losses = [
            learner.train(learner_batch(tiny_dirs, rows=4, seed=step))["learner/loss"]
            for step in range(15)
        ]
        runs.append((losses, learner.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert len(set(runs[0][0])) > 1  # the weights moved
    for name, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][name]), name


def test_no_grad_evaluation_is_chunked_too():
    """`Learner.loss_value` runs the loss under no_grad: blocks run, nothing is saved."""
    student, batch = _pair()
    algorithm = GKD(beta=0.5, teacher_output="full")
    with torch.no_grad():
        whole = algorithm.loss(StudentLogits(student[:, :-1], chunk_tokens=0), batch)[0]
        chunked = algorithm.loss(StudentLogits(student[:, :-1], chunk_tokens=2), batch)[0]
    assert torch.equal(whole, chunked)


def test_scorer_payload_roundtrip(tiny_dirs):
    """The teacher scorer's own top-k + tail payload trains identically chunked."""
    teacher = load_model(tiny_dirs["teacher"]).eval()
    student = load_model(tiny_dirs["student"])
    plan = RolloutPlan(teacher_need="topk", topk=4, temperature=0.8)
    batch = teacher_outputs(teacher, learner_batch(tiny_dirs, rows=3), plan, 8)
    algorithm = GKD(beta=0.7, teacher_output="topk", topk=4, temperature=0.8)
    losses = [
        algorithm.loss(StudentForward(student, batch, chunk_tokens=c), batch)[0] for c in (0, 2)
    ]
    assert torch.equal(losses[0], losses[1])


def test_minillm_lm_loss_on_pretraining_text_is_chunked(tiny_dirs):
    """MiniLLM's LM term reads [N,L,V] logits of pre-training text: chunked, its value and
    parameter gradients equal the unchunked ones, and it equals a brute-force NLL."""
    model = load_model(tiny_dirs["student"])
    g = torch.Generator().manual_seed(3)
    text = torch.randint(4, 30, (3, 9), generator=g)
    text_mask = torch.arange(9) < torch.tensor([[9], [5], [2]])
    batch = learner_batch(tiny_dirs, rows=3).replace(
        pretrain_ids=text.masked_fill(~text_mask, 0), pretrain_mask=text_mask
    )
    results = []
    for chunk in (0, 2):
        model.zero_grad()
        lm = MiniLLM.lm_loss(StudentForward(model, batch, chunk_tokens=chunk), batch)
        lm.backward()
        results.append((lm.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    with torch.no_grad():
        logits = StudentForward(model, batch).forward_extra(batch.pretrain_ids, text_mask)
        logp = log_probs(logits.double())
    brute = (
        sum(
            -logp[row, i, batch.pretrain_ids[row, i + 1]]
            for row in range(3)
            for i in range(8)
            if text_mask[row, i + 1]
        )
        / batch.pretrain_normaliser()
    )
    torch.testing.assert_close(results[0][0].double(), brute, rtol=1e-6, atol=1e-6)
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-6, atol=1e-9, msg=name)
