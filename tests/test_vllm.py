"""The vLLM rollout sampler and teacher scorer against the HF reference (component tier).

vLLM's CPU attention needs heads at least 32 wide, so these tests build their own tiny
Qwen2 pair with 32-wide heads (the shipped tiny student's heads are 16 wide; the sampler
refuses it on CPU with a message naming the HF backend). Run in the .venv-vllm tier of
.ci/run; skipped where vllm is not importable.

Tolerances (float32 on CPU): log-probs agree to 1e-4 absolute; the tail mass, which vLLM
only gives through the top-k (log(1 − Σ top-k)), to 1e-3.
"""

from __future__ import annotations

import os

import pytest
import torch

from protege.config import LoraConfig, RolloutConfig
from protege.modeling import load_model, load_tokenizer, response_logits
from protege.records import PromptBatch, RolloutBatch, RolloutPlan, WeightUpdate

pytestmark = pytest.mark.vllm
LOGPROB_TOL = 1e-4
TAIL_TOL = 1e-3
PROMPTS = ["12+34=", "7+8=", "99+1=", "5+55="]


@pytest.fixture(scope="module")
def head32_dirs(tmp_path_factory) -> dict[str, str]:
    """A student (2 layers x 64, 2 heads) and a teacher (2 layers x 128, 4 heads), both with
    32-wide heads, plus a second student seed used as 'trained' weights to sync."""
    from protege.tasks.tiny_models import build_char_tokenizer, build_tiny_model, tiny_config

    root = tmp_path_factory.mktemp("head32")
    tokenizer = build_char_tokenizer()
    shapes = {
        "student": ((2, 64, 2, 1, 128), 5),
        "student_b": ((2, 64, 2, 1, 128), 6),
        "teacher": ((2, 128, 4, 2, 256), 7),
    }
    dirs = {}
    for name, (shape, seed) in shapes.items():
        dirs[name] = str(root / name)
        build_tiny_model(tiny_config(*shape), seed).save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return dirs


def prompt_batch(tokenizer, texts=PROMPTS, step: int = 0) -> PromptBatch:
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return PromptBatch(
        encoded["input_ids"], encoded["attention_mask"].bool(), answers=tuple(texts), step=step
    )


def with_answers(tokenizer, prompts: PromptBatch) -> RolloutBatch:
    """The prompts with fixed responses (right-padded; the last one without <eos>)."""
    answers = tokenizer(
        ["46<eos>", "15<eos>", "100<eos>", "6"],
        return_tensors="pt",
        padding=True,
        padding_side="right",
        add_special_tokens=False,
    )
    return RolloutBatch(
        prompts.prompt_ids,
        prompts.prompt_mask,
        answers["input_ids"],
        answers["attention_mask"].bool(),
    )


def hf_logprobs(model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """log q(y_t) [B,T] by one teacher-forced HF forward, 0 where masked."""
    with torch.no_grad():
        logp = torch.log_softmax(response_logits(model, batch).float(), -1)
    sampled = logp.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    return torch.where(batch.response_mask, sampled, 0.0)


def hf_greedy(model, tokenizer, prompts: PromptBatch, max_new_tokens: int) -> list[str]:
    from protege.actors.sampler import HFSampler

    sampler = HFSampler.__new__(HFSampler)  # the HF reference loop around a given model
    sampler.rollout, sampler.tokenizer, sampler.student = RolloutConfig(), tokenizer, model.eval()
    sampler._teacher, sampler.pad_id = None, int(tokenizer.pad_token_id)
    sampler.eos_ids = torch.tensor([int(tokenizer.eos_token_id)])
    sampler.generator = torch.Generator()
    return sampler.greedy_texts(prompts, max_new_tokens)


@pytest.fixture(scope="module")
def sampler(head32_dirs):
    from protege.actors.vllm_sampler import VLLMSampler

    rollout = RolloutConfig(backend="vllm", max_new_tokens=8)
    return VLLMSampler(head32_dirs["student"], rollout, seed=0)


def test_full_sync_parity_with_hf(sampler, head32_dirs):
    """After a full weight sync, vLLM's behaviour/student log-probs of what it sampled equal
    the learner's HF recompute with the new weights, and greedy outputs match."""
    trained = load_model(head32_dirs["student_b"]).eval()
    sampler.load_weights(WeightUpdate(version=1, tensors=trained.state_dict()))
    assert sampler.version == 1
    tokenizer = load_tokenizer(head32_dirs["student"])
    prompts = prompt_batch(tokenizer)
    batch = sampler.generate(prompts, RolloutPlan(samples_per_prompt=3))
    assert batch.size == 3 * len(PROMPTS) and batch.weights_version == 1
    assert batch.group_ids.tolist() == [i for i in range(len(PROMPTS)) for _ in range(3)]
    reference = hf_logprobs(trained, batch)
    assert torch.allclose(batch.student_logprobs, reference, atol=LOGPROB_TOL)
    assert torch.allclose(batch.behaviour_logprobs, reference, atol=LOGPROB_TOL)
    # A row ends at its first EOS (kept in the mask) or after max_new_tokens.
    eos = int(tokenizer.eos_token_id)
    for ids, mask in zip(batch.response_ids, batch.response_mask):
        real = ids[mask].tolist()
        assert eos not in real[:-1] and (real[-1] == eos or len(real) == 8)
    assert sampler.greedy_texts(prompts, 8) == hf_greedy(trained, tokenizer, prompts, 8)


def test_tempered_behaviour_logprobs(head32_dirs):
    """At temperature 0.7 the behaviour log-probs are those of the tempered distribution,
    and the student log-probs stay at temperature 1."""
    from protege.actors.vllm_sampler import VLLMSampler

    rollout = RolloutConfig(backend="vllm", max_new_tokens=6, temperature=0.7)
    tempered = VLLMSampler(head32_dirs["student"], rollout, seed=1)
    tokenizer = load_tokenizer(head32_dirs["student"])
    batch = tempered.generate(prompt_batch(tokenizer), RolloutPlan(samples_per_prompt=2))
    model = load_model(head32_dirs["student"]).eval()
    with torch.no_grad():
        logits = response_logits(model, batch).float()
    ids = batch.response_ids.unsqueeze(-1)
    at_07 = torch.log_softmax(logits / 0.7, -1).gather(-1, ids).squeeze(-1)
    mask = batch.response_mask
    assert torch.allclose(batch.behaviour_logprobs[mask], at_07[mask], atol=LOGPROB_TOL)
    assert torch.allclose(batch.student_logprobs, hf_logprobs(model, batch), atol=LOGPROB_TOL)


def test_refuses_teacher_steered_decoding():
    from protege.actors.vllm_sampler import VLLMSampler
    from protege.records import RewriteSpec

    for plan in (
        RolloutPlan(mix_alpha=0.2),
        RolloutPlan(rewrite=RewriteSpec(threshold=1.0)),
        RolloutPlan(source="teacher"),
    ):
        reason = VLLMSampler.supports(plan)
        assert reason is not None and "rollout.backend=hf" in reason
    assert VLLMSampler.supports(RolloutPlan(samples_per_prompt=4)) is None


def test_refuses_cpu_head_size_with_hint():
    from protege.actors.vllm_engine import check_cpu_head_size
    from protege.modeling import resolve_path

    if torch.cuda.is_available():
        pytest.skip("the head-size limit is the CPU kernel's")
    with pytest.raises(ValueError, match="rollout.backend=hf"):
        check_cpu_head_size(resolve_path("builtin:tiny/student"))  # 16-wide heads


def _random_adapter(base_dir: str, lora: LoraConfig, seed: int):
    """A peft model over the base with a non-trivial adapter (B != 0), and its tensors."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, get_peft_model_state_dict

    model = load_model(base_dir)
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return peft_model.eval(), get_peft_model_state_dict(peft_model)


def test_lora_sync_equals_merged_and_self_teacher_is_base(head32_dirs):
    """A LoRA-only sync changes vLLM's outputs exactly as merging the adapter would; a
    second version replaces the first; with no adapter the same engine is the base model
    (the LoRA self-distillation teacher)."""
    from protege.actors.vllm_sampler import VLLMSampler

    lora = LoraConfig(enabled=True, r=8, alpha=16.0)
    rollout = RolloutConfig(backend="vllm", max_new_tokens=6)
    engine = VLLMSampler(head32_dirs["student"], rollout, teacher_model="self", lora=lora)
    tokenizer = load_tokenizer(head32_dirs["student"])
    prompts = prompt_batch(tokenizer)
    base = load_model(head32_dirs["student"]).eval()
    for version, seed in ((1, 11), (2, 12)):
        peft_model, adapter = _random_adapter(head32_dirs["student"], lora, seed)
        engine.load_weights(WeightUpdate(version=version, tensors=adapter, lora_only=True))
        merged = peft_model.merge_and_unload().eval()
        batch = engine.generate(prompts, RolloutPlan(samples_per_prompt=2))
        assert torch.allclose(batch.student_logprobs, hf_logprobs(merged, batch), atol=LOGPROB_TOL)
        assert engine.greedy_texts(prompts, 6) == hf_greedy(merged, tokenizer, prompts, 6)
    assert engine.llm.llm_engine.list_loras() == {2}  # old versions are unloaded
    plan = RolloutPlan(teacher_need="topk", topk=5)
    scored = engine.score_as_teacher(batch, plan)
    assert torch.allclose(scored.teacher_logprobs, hf_logprobs(base, batch), atol=LOGPROB_TOL)


def test_teacher_scorer_matches_hf(head32_dirs):
    """Sampled-token log-probs and top-k (ids, log-probs, tail) equal the HF scorer's."""
    from protege.actors.teacher import TeacherScorer
    from protege.actors.vllm_teacher import VLLMTeacherScorer

    tokenizer = load_tokenizer(head32_dirs["teacher"])
    prompts = prompt_batch(tokenizer)
    batch = with_answers(tokenizer, prompts)
    vllm_teacher = VLLMTeacherScorer(head32_dirs["teacher"], micro_batch_size=3)
    hf_teacher = TeacherScorer(head32_dirs["teacher"])
    assert vllm_teacher.vocab_size == hf_teacher.vocab_size
    mask = batch.response_mask
    for k in (4, 64):  # 64 > V: K = V, no tail
        plan = RolloutPlan(teacher_need="topk", topk=k)
        got, want = vllm_teacher.score(batch, plan), hf_teacher.score(batch, plan)
        assert torch.allclose(got.teacher_logprobs, want.teacher_logprobs, atol=LOGPROB_TOL)
        assert torch.equal(got.teacher_topk_ids[mask], want.teacher_topk_ids[mask])
        assert torch.allclose(
            got.teacher_topk_logprobs[mask], want.teacher_topk_logprobs[mask], atol=LOGPROB_TOL
        )
        assert torch.allclose(
            got.teacher_tail_logprobs[mask], want.teacher_tail_logprobs[mask], atol=TAIL_TOL
        )
    sampled = vllm_teacher.score(batch, RolloutPlan(teacher_need="sampled"))
    assert sampled.teacher_topk_ids is None
    with pytest.raises(ValueError, match="teacher.backend=hf"):
        vllm_teacher.score(batch, RolloutPlan(teacher_need="full"))


def test_a_privileged_vllm_teacher_scores_its_own_prompt_like_hf(head32_dirs):
    """A teacher shown another prompt (protege.privileged): the vLLM scorer reads the teacher's
    prompt, then the student's response, exactly as the HF scorer does; the same prompt as
    the student's gives the ordinary scores."""
    from protege.actors.teacher import TeacherScorer
    from protege.actors.vllm_teacher import VLLMTeacherScorer
    from protege.teacher_prompts import TeacherPrompts

    tokenizer = load_tokenizer(head32_dirs["teacher"])
    prompts = prompt_batch(tokenizer)
    hinted = prompt_batch(
        tokenizer, [f"{a};{p}" for a, p in zip(["46", "15", "100", "60"], PROMPTS)]
    )
    batch = with_answers(tokenizer, prompts)
    views = {
        "hint": TeacherPrompts({"teacher": hinted.prompt_ids}, {"teacher": hinted.prompt_mask}),
        "same": TeacherPrompts({"teacher": prompts.prompt_ids}, {"teacher": prompts.prompt_mask}),
    }
    vllm_teacher = VLLMTeacherScorer(head32_dirs["teacher"], micro_batch_size=3)
    hf_teacher = TeacherScorer(head32_dirs["teacher"])
    plan = RolloutPlan(teacher_need="topk", topk=4, teacher_prompt="teacher")
    ordinary = vllm_teacher.score(batch, RolloutPlan(teacher_need="topk", topk=4))
    mask = batch.response_mask
    for name, view in views.items():
        viewed = batch.replace(teacher_prompts=view)
        got, want = vllm_teacher.score(viewed, plan), hf_teacher.score(viewed, plan)
        assert torch.allclose(got.teacher_logprobs, want.teacher_logprobs, atol=LOGPROB_TOL)
        assert torch.equal(got.teacher_topk_ids[mask], want.teacher_topk_ids[mask])
        assert torch.allclose(
            got.teacher_topk_logprobs[mask], want.teacher_topk_logprobs[mask], atol=LOGPROB_TOL
        )
        assert torch.equal(got.prompt_ids, batch.prompt_ids)  # handed back as the student's
        change = (got.teacher_logprobs - ordinary.teacher_logprobs).abs().max()
        assert change > 1e-3 if name == "hint" else change <= LOGPROB_TOL, (name, change)


def test_broadcast_source_metadata_matches_what_it_sends(head32_dirs):
    """The NCCL path's weight source declares exactly the (name, shape, dtype) sequence it
    then yields — vLLM's receivers allocate from the declaration (CPU check of the GPU path)."""
    from protege.actors.vllm_weight_sync import GatheredSource

    model = load_model(head32_dirs["student"])
    source = GatheredSource(model, lambda: iter(model.state_dict().items()), torch.device("cpu"))
    declared = [(m.name, tuple(m.shape), m.dtype) for m in source.metadata()]
    sent = [(name, tuple(t.shape), t.dtype) for name, t in source]
    assert declared == sent and declared[0][0] == "model.embed_tokens.weight"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_on_gpu(head32_dirs):
    """The same parity on CUDA (bfloat16 would need a looser tolerance; float32 here)."""
    from protege.actors.vllm_sampler import VLLMSampler

    rollout = RolloutConfig(backend="vllm", max_new_tokens=8, gpu_memory_utilization=0.2)
    engine = VLLMSampler(head32_dirs["student"], rollout)
    trained = load_model(head32_dirs["student_b"]).eval()
    engine.load_weights(WeightUpdate(version=1, tensors=trained.state_dict()))
    batch = engine.generate(prompt_batch(load_tokenizer(head32_dirs["student"])), RolloutPlan())
    assert torch.allclose(batch.student_logprobs, hf_logprobs(trained, batch), atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_teacher_scorer_on_gpu_matches_hf(head32_dirs):
    """The vLLM teacher on CUDA (vLLM's device whenever one is visible) against the HF scorer
    on the CPU: every check of test_teacher_scorer_matches_hf."""
    test_teacher_scorer_matches_hf(head32_dirs)


if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") not in (None, "0"):
    pytest.skip("vLLM tests run the engine in-process", allow_module_level=True)
