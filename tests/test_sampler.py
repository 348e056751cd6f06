"""HFSampler: every decoding mode checked against teacher-forced recomputation."""

from __future__ import annotations

import math

import pytest
import torch

from protege.actors.decoding import nucleus
from protege.actors.sampler import HFSampler
from protege.config import LoraConfig, RolloutConfig
from protege.modeling import load_model, load_tokenizer, response_logits
from protege.records import (
    PromptBatch,
    RewriteSpec,
    RolloutBatch,
    RolloutPlan,
    TokenSource,
    WeightUpdate,
)
from protege.tasks.tiny_models import build_tiny_model, student_config

PROMPTS = ["12+34=", "7+5=", "99+1=", "0+0=", "45+67=", "3+80=", "50+50=", "8+9="]
ATOL = 1e-5


def make_prompts(tokenizer_dir: str, prompts: list[str] = PROMPTS, step: int = 0) -> PromptBatch:
    tokenizer = load_tokenizer(tokenizer_dir)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    answers = tuple(str(eval(p[:-1])) for p in prompts)
    return PromptBatch(enc["input_ids"], enc["attention_mask"].bool(), answers, step=step)


def rollout(**changes) -> RolloutConfig:
    return RolloutConfig(**{"max_new_tokens": 10, **changes})


def forced_logprobs(model, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """log-softmax(logits / temperature) [B,T,V] from one teacher-forced forward."""
    with torch.no_grad():
        return torch.log_softmax(response_logits(model, batch).float() / temperature, -1)


def gathered(logp: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
    return logp.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)


def assert_close_on_mask(actual, expected, mask):
    torch.testing.assert_close(actual[mask], expected[mask], atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def prompts(tiny_dirs) -> PromptBatch:
    return make_prompts(tiny_dirs["tokenizer"])


@pytest.fixture(scope="module")
def student(tiny_dirs):
    return load_model(tiny_dirs["student"]).eval()


@pytest.fixture(scope="module")
def teacher(tiny_dirs):
    return load_model(tiny_dirs["teacher"]).eval()


def sampler(tiny_dirs, teacher: bool = True, seed: int = 0, **rollout_changes) -> HFSampler:
    return HFSampler(
        tiny_dirs["student"],
        rollout(**rollout_changes),
        tiny_dirs["teacher"] if teacher else None,
        seed=seed,
    )


# -- student sampling -------------------------------------------------------------------


def test_student_sampling_logprobs_match_teacher_forcing(tiny_dirs, prompts, student):
    batch = sampler(tiny_dirs, teacher=False).generate(prompts, RolloutPlan())
    mask = batch.response_mask
    expected = gathered(forced_logprobs(student, batch), batch)
    assert_close_on_mask(batch.behaviour_logprobs, expected, mask)
    assert_close_on_mask(batch.student_logprobs, expected, mask)
    assert (batch.behaviour_logprobs[~mask] == 0).all() and (
        batch.student_logprobs[~mask] == 0
    ).all()
    assert (batch.token_source == TokenSource.STUDENT).all()
    assert batch.token_source.dtype == torch.int8 and batch.response_ids.dtype == torch.long


def test_tempered_behaviour_and_untempered_student_logprobs(tiny_dirs, prompts, student):
    batch = sampler(tiny_dirs, teacher=False, temperature=0.7).generate(prompts, RolloutPlan())
    mask = batch.response_mask
    assert_close_on_mask(
        batch.behaviour_logprobs, gathered(forced_logprobs(student, batch, 0.7), batch), mask
    )
    assert_close_on_mask(
        batch.student_logprobs, gathered(forced_logprobs(student, batch), batch), mask
    )


def test_top_p_samples_inside_the_nucleus(tiny_dirs, prompts, student):
    batch = sampler(tiny_dirs, teacher=False, top_p=0.5).generate(prompts, RolloutPlan())
    mask = batch.response_mask
    kept = nucleus(forced_logprobs(student, batch), 0.5)
    behaviour = gathered(kept, batch)
    assert torch.isfinite(behaviour[mask]).all()  # never a token outside the nucleus
    assert_close_on_mask(batch.behaviour_logprobs, behaviour, mask)


def test_nucleus_against_brute_force():
    logp = torch.log_softmax(torch.randn(4, 12, generator=torch.Generator().manual_seed(0)), -1)
    out = nucleus(logp, 0.6)
    for row in range(4):
        order = logp[row].argsort(descending=True).tolist()
        keep, mass = [], 0.0
        for i in order:  # the smallest prefix of most likely tokens with mass >= top_p
            keep.append(i)
            mass += logp[row, i].exp().item()
            if mass >= 0.6:
                break
        expected = torch.full_like(logp[row], -math.inf)
        expected[keep] = logp[row, keep] - logp[row, keep].logsumexp(0)
        torch.testing.assert_close(out[row], expected)
    assert nucleus(logp, 1.0) is logp


# -- masks, groups, determinism ---------------------------------------------------------


def test_masks_and_padding_after_eos(tiny_dirs, prompts):
    s = sampler(tiny_dirs, teacher=False, max_new_tokens=12)
    batch = s.generate(prompts, RolloutPlan())
    eos, pad = s.tokenizer.eos_token_id, s.tokenizer.pad_token_id
    ids, mask = batch.response_ids, batch.response_mask
    assert ids.shape[1] <= 12 and (mask.sum(-1) >= 1).all()
    for row in range(batch.size):
        length = int(mask[row].sum())
        assert mask[row, :length].all() and not mask[row, length:].any()  # a prefix
        eos_at = (ids[row] == eos).nonzero().flatten().tolist()
        if eos_at:
            assert eos_at[0] == length - 1  # the mask ends on the first EOS, inclusive
        else:
            assert length == ids.shape[1] == 12  # unterminated: kept at max_new_tokens
        assert (ids[row, length:] == pad).all()
    ended = (ids == eos).any(-1)
    assert ended.any() and not ended.all()  # both kinds of row occur in this sample
    assert batch.extras["rollout/response_length"] == pytest.approx(
        float(mask.sum(-1).float().mean())
    )


def test_stops_when_every_row_has_ended():
    from protege.tasks import tiny

    s = HFSampler(tiny.student_path(), rollout(max_new_tokens=16))
    batch = s.generate(make_prompts(tiny.student_path()), RolloutPlan())
    assert batch.response_ids.shape[1] < 16
    assert batch.extras["rollout/truncated_fraction"] == 0.0


def test_samples_per_prompt_repeats_prompts_in_groups(tiny_dirs, prompts):
    batch = sampler(tiny_dirs, teacher=False).generate(prompts, RolloutPlan(samples_per_prompt=3))
    assert batch.size == 3 * prompts.size
    assert torch.equal(batch.group_ids, torch.arange(prompts.size).repeat_interleave(3))
    assert torch.equal(batch.prompt_ids, prompts.prompt_ids.repeat_interleave(3, 0))
    assert batch.answers == tuple(a for a in prompts.answers for _ in range(3))
    assert (
        len({tuple(r.tolist()) for r in batch.response_ids[:3]})
        + len({tuple(r.tolist()) for r in batch.response_ids[3:6]})
        > 2
    )  # samples of one prompt are not copies


def test_samples_depend_only_on_seed_and_step(tiny_dirs, prompts):
    """Seeded by (seed, step): a resumed run samples what the uninterrupted one did."""
    first = sampler(tiny_dirs, teacher=False, seed=5).generate(prompts, RolloutPlan())
    s = sampler(tiny_dirs, teacher=False, seed=5)
    s.generate(make_prompts(tiny_dirs["tokenizer"], step=3), RolloutPlan())  # another history
    again = s.generate(prompts, RolloutPlan())
    other_seed = sampler(tiny_dirs, teacher=False, seed=6).generate(prompts, RolloutPlan())
    other_step = s.generate(make_prompts(tiny_dirs["tokenizer"], step=1), RolloutPlan())
    assert torch.equal(first.response_ids, again.response_ids)
    assert torch.equal(first.behaviour_logprobs, again.behaviour_logprobs)
    assert not torch.equal(first.response_ids, other_seed.response_ids)
    assert not torch.equal(first.response_ids, other_step.response_ids)


def test_metadata_passes_through(tiny_dirs):
    prompts = make_prompts(tiny_dirs["tokenizer"], step=7)
    prompts = PromptBatch(
        prompts.prompt_ids,
        prompts.prompt_mask,
        prompts.answers,
        pretrain_ids=torch.ones(2, 3, dtype=torch.long),
        pretrain_mask=torch.ones(2, 3, dtype=torch.bool),
        step=7,
    )
    batch = sampler(tiny_dirs, teacher=False).generate(prompts, RolloutPlan())
    assert batch.step == 7 and batch.weights_version == 0 and batch.answers == prompts.answers
    assert batch.pretrain_ids is None  # text joins the batch at the driver (merge_shards)
    assert not batch.student_logprobs.is_inference()  # safe to use in a differentiated loss


# -- modes that need the teacher --------------------------------------------------------


def test_teacher_mixed_sampling_behaviour_is_the_mixture(tiny_dirs, prompts, student, teacher):
    alpha = 0.3
    batch = sampler(tiny_dirs).generate(prompts, RolloutPlan(mix_alpha=alpha))
    mask = batch.response_mask
    q = gathered(forced_logprobs(student, batch), batch).double().exp()
    p = gathered(forced_logprobs(teacher, batch), batch).double().exp()
    expected = torch.log(alpha * p + (1 - alpha) * q).float()
    assert_close_on_mask(batch.behaviour_logprobs, expected, mask)
    assert_close_on_mask(batch.student_logprobs, q.log().float(), mask)
    assert (batch.token_source == TokenSource.STUDENT).all()


def test_rewrite_with_zero_threshold_is_teacher_greedy_decoding(tiny_dirs, prompts, teacher):
    s = sampler(tiny_dirs)
    batch = s.generate(prompts, RolloutPlan(rewrite=RewriteSpec(threshold=0.0)))
    with torch.no_grad():
        greedy = teacher.generate(
            input_ids=prompts.prompt_ids,
            attention_mask=prompts.prompt_mask.long(),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=s.pad_id,
            eos_token_id=s.tokenizer.eos_token_id,
        )[:, prompts.prompt_ids.shape[1] :]
    assert torch.equal(batch.response_ids, greedy)
    mask = batch.response_mask
    assert (batch.token_source[mask] == TokenSource.TEACHER).all()
    assert (batch.behaviour_logprobs[mask] == 0).all()  # argmax: log 1
    assert batch.extras["rollout/rewrite_fraction"] == 1.0


def test_rewrite_with_huge_threshold_is_plain_student_sampling(tiny_dirs, prompts):
    plain = sampler(tiny_dirs, teacher=False).generate(prompts, RolloutPlan())
    gated = sampler(tiny_dirs).generate(prompts, RolloutPlan(rewrite=RewriteSpec(threshold=1e9)))
    assert torch.equal(gated.response_ids, plain.response_ids)
    assert torch.equal(gated.behaviour_logprobs, plain.behaviour_logprobs)
    assert (gated.token_source == TokenSource.STUDENT).all()
    assert gated.extras["rollout/rewrite_fraction"] == 0.0 and gated.extras["rollout/step_kl"] > 0


def test_nucleus_rewrite_behaviour_is_the_teacher_nucleus(tiny_dirs, prompts, teacher):
    spec = RewriteSpec(threshold=0.0, mode="nucleus", top_p=0.7)
    batch = sampler(tiny_dirs).generate(prompts, RolloutPlan(rewrite=spec))
    mask = batch.response_mask
    assert_close_on_mask(
        batch.behaviour_logprobs,
        gathered(nucleus(forced_logprobs(teacher, batch), 0.7), batch),
        mask,
    )


def test_step_rewrite_decides_once_per_step(tiny_dirs, prompts):
    s = sampler(tiny_dirs, max_new_tokens=16)
    probe = s.generate(prompts, RolloutPlan(rewrite=RewriteSpec(threshold=1e9)))
    delimiter = int(probe.response_ids[probe.response_mask].mode().values)  # a frequent token
    threshold = probe.extras["rollout/step_kl"]  # about half the steps above it
    batch = s.generate(
        prompts, RolloutPlan(rewrite=RewriteSpec(threshold, step_delimiter_id=delimiter))
    )
    ids, source, mask = batch.response_ids, batch.token_source, batch.response_mask
    for row in range(batch.size):
        for t in range(1, int(mask[row].sum())):
            if ids[row, t - 1] != delimiter:  # inside a step the writer never changes
                assert source[row, t] == source[row, t - 1]
    written = source[mask]
    assert (written == TokenSource.TEACHER).any() and (written == TokenSource.STUDENT).any()
    assert (
        0
        < batch.extras["rollout/rewritten_steps"]
        <= batch.extras["rollout/rewrite_fraction"] * mask.sum()
    )


def test_source_teacher_responses_come_from_the_teacher(tiny_dirs, prompts, student):
    batch = sampler(tiny_dirs, seed=3).generate(prompts, RolloutPlan(source="teacher"))
    as_student = HFSampler(tiny_dirs["teacher"], rollout(), seed=3).generate(prompts, RolloutPlan())
    assert torch.equal(batch.response_ids, as_student.response_ids)
    assert torch.equal(batch.behaviour_logprobs, as_student.behaviour_logprobs)
    mask = batch.response_mask
    assert (batch.token_source[mask] == TokenSource.TEACHER).all()
    assert_close_on_mask(
        batch.student_logprobs, gathered(forced_logprobs(student, batch), batch), mask
    )


def test_dataset_source_passes_completions_through(tiny_dirs, prompts, student):
    tokenizer = load_tokenizer(tiny_dirs["tokenizer"])
    completions = [a + tokenizer.eos_token for a in prompts.answers]
    enc = tokenizer(
        completions,
        return_tensors="pt",
        padding=True,
        padding_side="right",
        add_special_tokens=False,
    )
    with_completions = PromptBatch(
        prompts.prompt_ids,
        prompts.prompt_mask,
        prompts.answers,
        enc["input_ids"],
        enc["attention_mask"].bool(),
    )
    batch = sampler(tiny_dirs, teacher=False).generate(
        with_completions, RolloutPlan(source="dataset")
    )
    assert torch.equal(batch.response_ids, enc["input_ids"])
    assert (batch.token_source == TokenSource.DATASET).all() and batch.behaviour_logprobs is None
    assert_close_on_mask(
        batch.student_logprobs,
        gathered(forced_logprobs(student, batch), batch),
        batch.response_mask,
    )
    with pytest.raises(ValueError, match="completion"):
        sampler(tiny_dirs, teacher=False).generate(prompts, RolloutPlan(source="dataset"))


def test_modes_needing_a_teacher_refuse_without_one(tiny_dirs, prompts):
    s = sampler(tiny_dirs, teacher=False)
    for plan, mode in [
        (RolloutPlan(mix_alpha=0.2), "mix_alpha"),
        (RolloutPlan(rewrite=RewriteSpec(1.0)), "rewrite"),
        (RolloutPlan(source="teacher"), "source='teacher'"),
    ]:
        with pytest.raises(ValueError, match="teacher.model") as error:
            s.generate(prompts, plan)
        assert mode in str(error.value)


def test_supports_names_what_it_refuses():
    assert HFSampler.supports(RolloutPlan()) is None
    assert HFSampler.supports(RolloutPlan(mix_alpha=0.2, rewrite=RewriteSpec(1.0))) is None
    assert "source" in HFSampler.supports(RolloutPlan(source="teacher", mix_alpha=0.2))
    assert "mix_alpha" in HFSampler.supports(RolloutPlan(mix_alpha=1.5))


# -- weight updates ---------------------------------------------------------------------


def test_full_weight_update_replaces_the_student(tiny_dirs, prompts):
    s = sampler(tiny_dirs, teacher=False)
    other = build_tiny_model(student_config(), seed=77).eval()
    s.load_weights(WeightUpdate(version=2, tensors=other.state_dict()))
    assert s.version == 2
    batch = s.generate(prompts, RolloutPlan())
    assert batch.weights_version == 2
    assert_close_on_mask(
        batch.student_logprobs, gathered(forced_logprobs(other, batch), batch), batch.response_mask
    )
    with pytest.raises(ValueError, match="stale"):
        s.load_weights(WeightUpdate(version=1, tensors=other.state_dict()))
    with pytest.raises(ValueError, match="lora"):
        s.load_weights(WeightUpdate(version=3, tensors={}, lora_only=True))


def _trained_adapter(student_dir: str, lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        init_lora_weights=False,
    )
    torch.manual_seed(0)
    return get_peft_model(
        load_model(student_dir), config
    ).eval()  # random A and B: a "trained" adapter


def test_lora_update_matches_the_merged_model(tiny_dirs, prompts, student):
    from peft import get_peft_model_state_dict

    lora = LoraConfig(enabled=True, r=4)
    s = HFSampler(tiny_dirs["student"], rollout(), tiny_dirs["teacher"], lora=lora)
    before = s.generate(prompts, RolloutPlan())  # a fresh adapter (B = 0) is the base model
    assert_close_on_mask(
        before.student_logprobs,
        gathered(forced_logprobs(student, before), before),
        before.response_mask,
    )
    adapter = _trained_adapter(tiny_dirs["student"], lora)
    s.load_weights(
        WeightUpdate(version=1, tensors=get_peft_model_state_dict(adapter), lora_only=True)
    )
    merged = adapter.merge_and_unload()
    batch = s.generate(prompts, RolloutPlan())
    assert_close_on_mask(
        batch.student_logprobs, gathered(forced_logprobs(merged, batch), batch), batch.response_mask
    )
    with pytest.raises(ValueError, match="full weight update"):
        s.load_weights(WeightUpdate(version=2, tensors=student.state_dict()))
    with pytest.raises(ValueError, match="does not match"):
        s.load_weights(
            WeightUpdate(
                version=2,
                tensors={"base_model.model.nonsense.lora_A.weight": torch.zeros(1)},
                lora_only=True,
            )
        )


def test_self_teacher_is_the_base_model_with_the_adapter_off(tiny_dirs, prompts, student):
    from peft import get_peft_model_state_dict

    lora = LoraConfig(enabled=True, r=4)
    s = HFSampler(tiny_dirs["student"], rollout(), teacher_model="self", lora=lora, seed=4)
    s.load_weights(
        WeightUpdate(
            1, get_peft_model_state_dict(_trained_adapter(tiny_dirs["student"], lora)), True
        )
    )
    batch = s.generate(prompts, RolloutPlan(source="teacher"))
    base = HFSampler(tiny_dirs["student"], rollout(), seed=4).generate(prompts, RolloutPlan())
    assert torch.equal(batch.response_ids, base.response_ids)
    assert not torch.allclose(
        batch.student_logprobs, base.student_logprobs, atol=1e-3
    )  # adapter on


# -- evaluation -------------------------------------------------------------------------


def test_greedy_texts_are_greedy_decoding_and_leave_sampling_alone(tiny_dirs, prompts, student):
    s = sampler(tiny_dirs, teacher=False)
    texts = s.greedy_texts(prompts, max_new_tokens=6)
    with torch.no_grad():
        greedy = student.generate(
            input_ids=prompts.prompt_ids,
            attention_mask=prompts.prompt_mask.long(),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=s.pad_id,
            eos_token_id=s.tokenizer.eos_token_id,
        )[:, prompts.prompt_ids.shape[1] :]
    assert texts == s.tokenizer.batch_decode(greedy, skip_special_tokens=True)
    after_eval = s.generate(prompts, RolloutPlan())
    fresh = sampler(tiny_dirs, teacher=False).generate(prompts, RolloutPlan())
    assert torch.equal(after_eval.response_ids, fresh.response_ids)  # no random numbers drawn
