"""TeacherScorer / teacher_outputs against brute-force recomputation on tiny random models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from protege.actors.teacher import TeacherScorer, teacher_outputs
from protege.modeling import load_model, load_tokenizer, response_logits
from protege.records import RolloutBatch, RolloutPlan

PROMPTS = ["12+34=", "7+5=", "99+1=", "0+0=", "45+67="]


def make_batch(tokenizer_dir: str, response_len: int = 6, seed: int = 0) -> RolloutBatch:
    """Left-padded prompts and random right-padded responses of varied lengths (>= 1)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    g = torch.Generator().manual_seed(seed)
    rows = len(PROMPTS)
    ids = torch.randint(4, len(tokenizer), (rows, response_len), generator=g)
    lengths = torch.tensor([response_len, 1, 3, response_len - 1, 2])
    mask = torch.arange(response_len) < lengths[:, None]
    ids[torch.arange(rows), lengths - 1] = tokenizer.eos_token_id
    ids = torch.where(mask, ids, tokenizer.pad_token_id)
    return RolloutBatch(enc["input_ids"], enc["attention_mask"].bool(), ids, mask)


@pytest.fixture(scope="module")
def scorer(tiny_dirs) -> TeacherScorer:
    return TeacherScorer(tiny_dirs["teacher"], micro_batch_size=2)


@pytest.fixture(scope="module")
def batch(tiny_dirs) -> RolloutBatch:
    return make_batch(tiny_dirs["tokenizer"])


def reference_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return response_logits(model, batch).float()


def test_sampled_logprobs_are_a_gather_of_the_full_distribution(scorer, batch):
    out = scorer.score(batch, RolloutPlan(teacher_need="sampled"))
    logp = torch.log_softmax(reference_logits(scorer.model, batch), -1)
    expected = logp.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    mask = batch.response_mask
    torch.testing.assert_close(out.teacher_logprobs[mask], expected[mask], atol=1e-5, rtol=0)
    assert (out.teacher_logprobs[~mask] == 0).all()
    assert out.teacher_topk_ids is None and out.teacher_logits is None
    assert out.response_ids is batch.response_ids  # everything else passes through


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_matches_torch_topk_and_brute_force_tail(scorer, batch, temperature):
    k = 5
    out = scorer.score(batch, RolloutPlan(teacher_need="topk", topk=k, temperature=temperature))
    logp = torch.log_softmax(reference_logits(scorer.model, batch) / temperature, -1)
    values, ids = logp.topk(k, dim=-1)
    assert out.teacher_topk_ids.shape == (batch.size, batch.response_ids.shape[1], k)
    assert torch.equal(out.teacher_topk_ids, ids)
    torch.testing.assert_close(out.teacher_topk_logprobs, values, atol=1e-5, rtol=0)
    tail = torch.log1p(-values.double().exp().sum(-1))  # brute force: log(1 − Σ top-k mass)
    torch.testing.assert_close(out.teacher_tail_logprobs.double(), tail, atol=1e-5, rtol=0)
    assert out.teacher_logprobs is not None  # sampled log-probs always come along


def test_topk_covering_the_vocabulary_has_an_empty_tail(scorer, batch):
    out = scorer.score(batch, RolloutPlan(teacher_need="topk", topk=10_000))
    assert out.teacher_topk_ids.shape[-1] == scorer.vocab_size
    assert (out.teacher_tail_logprobs == -math.inf).all()
    mass = out.teacher_topk_logprobs.double().exp().sum(-1)
    torch.testing.assert_close(mass, torch.ones_like(mass), atol=1e-5, rtol=0)


def test_full_logits_equal_response_logits(scorer, batch):
    out = scorer.score(batch, RolloutPlan(teacher_need="full"))
    expected = reference_logits(scorer.model, batch)
    assert out.teacher_logits.dtype == torch.float32
    assert out.teacher_logits.shape == (batch.size, batch.response_ids.shape[1], scorer.vocab_size)
    torch.testing.assert_close(out.teacher_logits, expected, atol=1e-5, rtol=0)


def test_none_returns_the_batch_unchanged(scorer, batch):
    assert scorer.score(batch, RolloutPlan(teacher_need="none")) is batch


def test_micro_batching_does_not_change_results(tiny_dirs, batch):
    model = load_model(tiny_dirs["teacher"]).eval()
    plan = RolloutPlan(teacher_need="topk", topk=4)
    whole = teacher_outputs(model, batch, plan, micro_batch_size=64)
    split = teacher_outputs(model, batch, plan, micro_batch_size=2)
    for name in ("teacher_logprobs", "teacher_topk_logprobs", "teacher_tail_logprobs"):
        torch.testing.assert_close(getattr(split, name), getattr(whole, name), atol=1e-5, rtol=0)


def test_outputs_can_enter_a_differentiated_loss(scorer, batch):
    """In-process (no Ray copy), a loss the learner differentiates reads these tensors."""
    out = scorer.score(batch, RolloutPlan(teacher_need="full"))
    assert not out.teacher_logits.is_inference() and not out.teacher_logprobs.is_inference()
    student = torch.zeros_like(out.teacher_logits, requires_grad=True)
    (torch.log_softmax(student, -1) * out.teacher_logits.softmax(-1)).sum().backward()
    assert student.grad is not None


def test_adapter_disabled_peft_model_scores_like_the_base(tiny_dirs, batch):
    """LoRA self-distillation: the learner scores with the adapter off."""
    from peft import LoraConfig, get_peft_model

    base = load_model(tiny_dirs["student"]).eval()
    expected = teacher_outputs(base, batch, RolloutPlan(), 64).teacher_logprobs
    peft_model = get_peft_model(
        load_model(tiny_dirs["student"]),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ).eval()
    with_adapter = teacher_outputs(peft_model, batch, RolloutPlan(), 64).teacher_logprobs
    with peft_model.disable_adapter():
        without = teacher_outputs(peft_model, batch, RolloutPlan(), 64).teacher_logprobs
    torch.testing.assert_close(without, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(with_adapter, expected, atol=1e-3)


def test_bad_arguments_are_refused(tiny_dirs, scorer, batch):
    with pytest.raises(ValueError, match="topk"):
        scorer.score(batch, RolloutPlan(teacher_need="topk", topk=0))
    with pytest.raises(ValueError, match="self"):
        TeacherScorer("self")
    with pytest.raises(ValueError, match="micro_batch_size"):
        TeacherScorer(tiny_dirs["teacher"], micro_batch_size=0)
    assert scorer.vocab_size == len(load_tokenizer(tiny_dirs["tokenizer"]))


@pytest.fixture(scope="module")
def padded_teacher(tiny_dirs, tmp_path_factory) -> str:
    """The tiny teacher with its (tied) embedding padded from 30 to 48 rows, randomly
    initialised: the Qwen2.5-7B-vs-0.5B shape (152064 vs 151936 rows, 151665 token ids)."""
    model = load_model(tiny_dirs["teacher"])
    width = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(width + 18, mean_resizing=False)
    path = str(tmp_path_factory.mktemp("padded") / "teacher")
    model.save_pretrained(path)
    load_tokenizer(tiny_dirs["teacher"]).save_pretrained(path)
    return path


@pytest.mark.parametrize("need", ["topk", "full", "sampled"])
def test_a_padded_teacher_ships_distributions_over_the_tokenizers_ids(
    tiny_dirs, padded_teacher, batch, need
):
    """Top-k ids index the student's logits (they failed with "index 37 is out of bounds"
    under the default top-k), and every output equals the brute-force distribution
    renormalised over the ids the tokenizer emits."""
    from protege.algorithms import build_algorithm

    scorer = TeacherScorer(padded_teacher, micro_batch_size=2)
    vocab = len(load_tokenizer(tiny_dirs["tokenizer"]))
    assert scorer.vocab_size == vocab < scorer.model.get_output_embeddings().weight.shape[0]
    out = scorer.score(batch, RolloutPlan(teacher_need=need, topk=64))
    logp = torch.log_softmax(reference_logits(scorer.model, batch)[..., :vocab], -1)
    mask = batch.response_mask
    sampled = logp.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.teacher_logprobs[mask], sampled[mask], atol=1e-5, rtol=0)
    if need == "topk":
        assert out.teacher_topk_ids.shape[-1] == vocab and int(out.teacher_topk_ids.max()) < vocab
        torch.testing.assert_close(out.teacher_topk_logprobs, logp.topk(vocab, -1).values)
    if need == "full":
        assert out.teacher_logits.shape[-1] == vocab
    if need != "sampled":  # the student's loss runs on it (the width of its logits: vocab)
        gkd = build_algorithm({"name": "gkd", "teacher_output": need})
        student = load_model(tiny_dirs["student"])
        forward = SimpleNamespace(logits=reference_logits(student, batch))  # what losses read
        loss, _ = gkd.loss(forward, out)
        assert torch.isfinite(loss)


def test_a_logits_budget_splits_rows_without_changing_any_output(monkeypatch):
    """Rows scored a few at a time (a small LOGITS_BUDGET) give exactly the outputs of one
    forward over the whole batch."""
    from protege.actors import teacher as module
    from protege.modeling import load_model

    model = load_model("builtin:tiny/teacher").eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 20, (6, 5), generator=g)
    mask = torch.ones(6, 5, dtype=torch.bool)
    batch = RolloutBatch(ids, mask, ids.flip(1), mask.clone())
    plan = RolloutPlan(teacher_need="topk", topk=4)
    whole = module.teacher_outputs(model, batch, plan, micro_batch_size=64)
    vocab = model.config.vocab_size
    monkeypatch.setattr(module, "LOGITS_BUDGET", 2 * 6 * vocab)  # two rows per forward
    assert module.rows_within_budget(model, batch, 64) == 2
    split = module.teacher_outputs(model, batch, plan, micro_batch_size=64)
    for name in (
        "teacher_logprobs",
        "teacher_topk_ids",
        "teacher_topk_logprobs",
        "teacher_tail_logprobs",
    ):
        torch.testing.assert_close(getattr(split, name), getattr(whole, name), rtol=0, atol=1e-6)


def test_a_bfloat16_teacher_keeps_its_answers_and_log_probs():
    """teacher.dtype=bfloat16 halves the teacher's memory; on the test sums (teacher-forced
    on the right answers) it must pick the same tokens as in float32 and score them within
    a few hundredths of a nat (computed in float32 where the CPU only stores bfloat16, as
    here: protege.cpu_bf16)."""
    from protege.data import PromptSource, read_jsonl

    tokenizer = load_tokenizer("builtin:tiny/teacher")
    rows = read_jsonl("builtin:tiny/test")[:64]
    prompts = PromptSource(rows, tokenizer, batch_size=64).next(0)
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in prompts.answers]
    width = max(map(len, answers))
    ids = torch.tensor([a + [tokenizer.pad_token_id] * (width - len(a)) for a in answers])
    mask = torch.tensor([[i < len(a) for i in range(width)] for a in answers])
    batch = RolloutBatch(prompts.prompt_ids, prompts.prompt_mask.bool(), ids, mask)
    plan = RolloutPlan(teacher_need="full")
    scores = {
        dtype: TeacherScorer("builtin:tiny/teacher", dtype=dtype).score(batch, plan)
        for dtype in ("float32", "bfloat16")
    }
    full, half = scores["float32"], scores["bfloat16"]
    picks = [s.teacher_logits.argmax(-1)[mask] for s in (full, half)]
    assert float((picks[0] == picks[1]).float().mean()) >= 0.98
    assert float((picks[0] == ids[mask]).float().mean()) >= 0.95  # the teacher is right
    gap = (full.teacher_logprobs - half.teacher_logprobs)[mask].abs()
    assert float(gap.mean()) < 0.05
