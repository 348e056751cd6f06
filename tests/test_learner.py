"""Learner (DeepSpeed engine, LoRA, checkpoints) on the tiny models from `tiny_dirs`.

Batches are built directly: random prompts/responses, teacher outputs from a forward of
the (differently seeded) tiny teacher.
"""

from __future__ import annotations

import math
import socket
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from protege.actors.deepspeed_engine import TrainingEngine, lr_multiplier
from protege.actors.learner import Learner
from protege.actors.teacher import teacher_outputs
from protege.config import Config, ConfigError, config_from_dict
from protege.modeling import load_model, response_logits
from protege.records import RolloutBatch, RolloutPlan

# DeepSpeed's ZeRO-3 calls torch.distributed APIs that torch marks deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.*` is deprecated:FutureWarning")

VOCAB, PROMPT_LEN, RESPONSE_LEN = 30, 5, 6
FULL = RolloutPlan(teacher_need="full")


def make_config(tiny_dirs, lora: bool = False, algorithm: dict | None = None, **learner) -> Config:
    tree = {
        "student": {"model": tiny_dirs["student"], "lora": {"enabled": lora, "r": 4}},
        "teacher": {"model": "self" if lora else tiny_dirs["teacher"], "micro_batch_size": 3},
        "learner": {"lr": 1e-2, "micro_batch_size": 4, **learner},
        "algorithm": algorithm or {"name": "gkd", "teacher_output": "full"},
        "trainer": {"steps": 10},
        "data": {"train": "builtin:tiny/train"},  # own model copies: name the data
    }
    return config_from_dict(tree)


def make_batch(tiny_dirs, rows: int = 4, seed: int = 0, plan: RolloutPlan = FULL) -> RolloutBatch:
    """Left-padded prompts, right-padded responses of varied lengths, teacher outputs."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(4, VOCAB, (rows, PROMPT_LEN), generator=g)
    prompt_mask = torch.ones(rows, PROMPT_LEN, dtype=torch.bool)
    prompt_mask[0, :2] = False  # left padding
    prompt_ids[~prompt_mask] = 0
    lengths = torch.randint(1, RESPONSE_LEN + 1, (rows,), generator=g)
    lengths[0] = RESPONSE_LEN
    response_mask = torch.arange(RESPONSE_LEN) < lengths[:, None]
    response_ids = torch.randint(4, VOCAB, (rows, RESPONSE_LEN), generator=g).masked_fill(
        ~response_mask, 0
    )
    batch = RolloutBatch(prompt_ids, prompt_mask, response_ids, response_mask)
    return teacher_outputs(_teacher(tiny_dirs["teacher"]), batch, plan, micro_batch_size=8)


_TEACHERS: dict[str, torch.nn.Module] = {}


def _teacher(path: str) -> torch.nn.Module:
    if path not in _TEACHERS:
        _TEACHERS[path] = load_model(path).eval()
    return _TEACHERS[path]


def weights(learner: Learner) -> dict[str, torch.Tensor]:
    return learner.state_dict()  # gathered: under ZeRO-3 the live parameters are empty shards


def assert_weights_equal(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], atol=atol, rtol=0, msg=name)


def logits_of(model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    with torch.no_grad():
        return response_logits(model, batch).float()


def zero3_slow(*values):
    """A ZeRO-3 case that takes over ~1.5 s on CPU: the slow tier (cheaper ZeRO-3 cases stay)."""
    return pytest.param(*values, marks=pytest.mark.slow)


# -- training ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "zero_stage, precision",
    [(0, "fp32"), (1, "fp32"), (2, "fp32"), zero3_slow(3, "fp32"), (0, "bf16"), (2, "bf16")],
)
def test_gkd_loss_decreases_on_a_fixed_batch(tiny_dirs, zero_stage, precision):
    learner = Learner(make_config(tiny_dirs, zero_stage=zero_stage, precision=precision, lr=3e-3))
    batch = make_batch(tiny_dirs, rows=6)
    losses = []
    for _ in range(8):
        metrics = learner.train(batch)
        assert metrics["learner/skipped"] == 0.0 and math.isfinite(metrics["learner/grad_norm"])
        losses.append(metrics["learner/loss"])
    assert learner.version == 8
    assert losses[-1] < 0.8 * losses[0], losses
    assert metrics["learner/loss"] == pytest.approx(metrics["gkd/jsd"])
    assert metrics["learner/tokens"] == batch.num_response_tokens


def test_micro_batches_give_the_same_update_as_the_whole_batch(tiny_dirs):
    batch = make_batch(tiny_dirs, rows=5)
    # Adam's first step is lr·g/(|g|+ε): for gradients near ε it magnifies float rounding by
    # lr/ε, so the tolerance only holds for a moderate lr.
    whole = Learner(make_config(tiny_dirs, micro_batch_size=5, lr=1e-3))
    split = Learner(make_config(tiny_dirs, micro_batch_size=1, lr=1e-3))
    assert_weights_equal(weights(whole), weights(split))
    m_whole, m_split = whole.train(batch), split.train(batch)
    assert m_split["learner/loss"] == pytest.approx(m_whole["learner/loss"], rel=1e-5)
    assert m_split["learner/grad_norm"] == pytest.approx(m_whole["learner/grad_norm"], rel=1e-5)
    assert_weights_equal(weights(whole), weights(split), atol=1e-6)


@pytest.mark.parametrize("zero_stage", [0, 2, zero3_slow(3)])
def test_nonfinite_loss_skips_the_step_and_leaves_weights_and_optimizer_untouched(
    tiny_dirs, zero_stage
):
    batch = make_batch(tiny_dirs)
    poisoned = batch.replace(
        teacher_logits=batch.teacher_logits.clone().index_fill_(1, torch.tensor([2]), math.nan)
    )
    skipping = Learner(make_config(tiny_dirs, zero_stage=zero_stage, micro_batch_size=2))
    reference = Learner(make_config(tiny_dirs, zero_stage=zero_stage, micro_batch_size=2))
    before = weights(skipping)

    metrics = skipping.train(poisoned)

    assert metrics["learner/skipped"] == 1.0 and metrics["learner/nonfinite"] == 1.0
    assert not math.isfinite(metrics["learner/loss"])
    assert skipping.version == 0
    assert_weights_equal(weights(skipping), before)
    # No trace left in the optimizer or the LR schedule: the next step is a first step.
    skipping.train(batch), reference.train(batch)
    assert_weights_equal(weights(skipping), weights(reference))
    assert skipping.version == 1


@pytest.mark.parametrize(
    "zero_stage, precision",
    [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"), (2, "bf16")],
)
def test_engine_skips_a_nonfinite_gradient_behind_a_finite_loss(tiny_dirs, zero_stage, precision):
    config = make_config(tiny_dirs, zero_stage=zero_stage, precision=precision).learner
    engine = TrainingEngine(load_model(tiny_dirs["student"]), config, total_steps=10, world_size=1)
    batch = make_batch(tiny_dirs)
    before = engine.gathered_state_dict()
    logits = response_logits(engine.module, batch).float()
    loss = torch.sqrt(logits * 0.0).sum()  # value 0, gradient ∞·0 = NaN
    assert loss.item() == 0.0
    engine.backward(loss)
    result = engine.step()
    assert not result.applied and not math.isfinite(result.grad_norm)
    assert_weights_equal(engine.gathered_state_dict(), before)
    assert result.lr == engine.lr == config.lr  # the schedule did not advance


def test_batch_without_response_tokens_is_a_clean_skip(tiny_dirs):
    learner = Learner(make_config(tiny_dirs))
    batch = make_batch(tiny_dirs)
    empty = batch.replace(response_mask=torch.zeros_like(batch.response_mask))
    before = weights(learner)
    metrics = learner.train(empty)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["learner/skipped"] == 1.0 and metrics["learner/empty_batch"] == 1.0
    assert metrics["learner/nonfinite"] == 0.0 and metrics["learner/tokens"] == 0.0
    assert learner.version == 0
    assert_weights_equal(weights(learner), before)


def test_minillm_adds_the_language_modelling_loss_on_pretraining_rows(tiny_dirs):
    algorithm = {"name": "minillm", "teacher_output": "topk", "topk": 8, "lm_coef": 0.5}
    config = make_config(tiny_dirs, algorithm=algorithm)
    learner = Learner(config)
    student = load_model(tiny_dirs["student"])
    batch = make_batch(tiny_dirs, plan=RolloutPlan(teacher_need="topk", topk=8))
    sampled = (
        logits_of(student, batch).log_softmax(-1).gather(-1, batch.response_ids[..., None])[..., 0]
    )
    batch = batch.replace(student_logprobs=sampled, behaviour_logprobs=sampled)
    batch = config.build_algorithm().advantages(batch)
    text = torch.randint(4, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    text_mask = torch.ones_like(text, dtype=torch.bool)
    text_mask[2, 5:] = False  # right padding
    with_text = batch.replace(pretrain_ids=text, pretrain_mask=text_mask)

    metrics = learner.train(with_text)

    with torch.no_grad():
        logits = student(input_ids=text, attention_mask=text_mask.long()).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), text[:, 1:], reduction="none"
    )
    targets = text_mask[:, 1:] & text_mask[:, :-1]
    expected = (nll * targets).sum() / targets.sum()
    without = Learner(config).train(batch)  # same weights, no text: no LM term
    assert "minillm/lm_loss" not in without
    assert metrics["minillm/lm_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["learner/loss"] == pytest.approx(
        without["learner/loss"] + 0.5 * expected.item(), rel=1e-5
    )


def test_lr_schedules():
    assert [lr_multiplier(s, "constant", 2, 10) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert [lr_multiplier(s, "linear", 0, 4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    cosine = [lr_multiplier(s, "cosine", 1, 5) for s in range(6)]
    assert (
        cosine[0] == 1.0
        and cosine[1] == 1.0
        and cosine[3] == pytest.approx(0.5)
        and cosine[5] == 0.0
    )


def test_learning_rate_follows_the_schedule(tiny_dirs):
    learner = Learner(make_config(tiny_dirs, lr=1e-2, lr_schedule="linear", warmup_steps=2))
    batch = make_batch(tiny_dirs)
    lrs = [learner.train(batch)["learner/lr"] for _ in range(4)]
    expected = [1e-2 * lr_multiplier(s, "linear", 2, 10) for s in range(4)]
    assert lrs == pytest.approx(expected)


# -- LoRA and self-distillation -------------------------------------------------------------
def test_lora_trains_only_the_adapter(tiny_dirs):
    learner = Learner(make_config(tiny_dirs, lora=True))
    before = weights(learner)
    learner.train(make_batch(tiny_dirs))
    after = weights(learner)
    trainable = {name for name, p in learner.model.named_parameters() if p.requires_grad}
    assert before.keys() >= trainable
    assert trainable and all("lora_" in name for name in trainable)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and changed <= trainable
    assert {name for name in trainable if "lora_B" in name} <= changed  # B starts at zero


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_score_as_teacher_is_the_base_model_with_the_adapter_disabled(tiny_dirs, zero_stage):
    learner = Learner(make_config(tiny_dirs, lora=True, zero_stage=zero_stage))
    batch = make_batch(tiny_dirs, rows=5)
    learner.train(batch)  # a non-zero adapter, so enabled and disabled differ
    scored = learner.score_as_teacher(batch.replace(teacher_logits=None), FULL)
    base = load_model(tiny_dirs["student"])
    expected = teacher_outputs(base, batch, FULL, micro_batch_size=8)
    torch.testing.assert_close(scored.teacher_logits, expected.teacher_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        scored.teacher_logprobs, expected.teacher_logprobs, atol=1e-5, rtol=0
    )
    adapted = logits_of(learner.model, batch)
    assert (adapted - expected.teacher_logits).abs().max() > 1e-4
    assert learner.model.training  # back in training mode
    assert (
        learner.train(scored)["learner/skipped"] == 0.0
    )  # scored outputs train (no inference tensors)


def test_score_as_teacher_needs_lora(tiny_dirs):
    with pytest.raises(ValueError, match="lora"):
        Learner(make_config(tiny_dirs)).score_as_teacher(make_batch(tiny_dirs), FULL)


# -- weights out ---------------------------------------------------------------------------
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_exported_weights_load_into_a_plain_hf_model(tiny_dirs, zero_stage):
    learner = Learner(make_config(tiny_dirs, zero_stage=zero_stage))
    batch = make_batch(tiny_dirs)
    learner.train(batch)
    update = learner.export_weights()
    assert update.version == 1 and not update.lora_only
    assert all(t.device.type == "cpu" for t in update.tensors.values())
    if zero_stage == 0:  # the snapshot copies the tied head once, apart from the live weight
        head, embedding = (
            update.tensors["lm_head.weight"],
            update.tensors["model.embed_tokens.weight"],
        )
        assert head is embedding
        assert head.data_ptr() != learner.model.get_output_embeddings().weight.data_ptr()
    fresh = load_model(tiny_dirs["student"])
    fresh.load_state_dict(update.tensors, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        live = logits_of(learner.model, batch)
    torch.testing.assert_close(logits_of(fresh, batch), live, atol=0, rtol=0)
    assert not torch.equal(
        logits_of(fresh, batch), logits_of(load_model(tiny_dirs["student"]), batch)
    )


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_lora_export_is_the_adapter_only(tiny_dirs, zero_stage):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    learner = Learner(make_config(tiny_dirs, lora=True, zero_stage=zero_stage))
    batch = make_batch(tiny_dirs)
    learner.train(batch)
    update = learner.export_weights()
    assert update.lora_only and update.tensors and all("lora_" in name for name in update.tensors)
    lora = learner.config.student.lora
    fresh = get_peft_model(
        load_model(tiny_dirs["student"]),
        LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules)),
    )
    set_peft_model_state_dict(fresh, update.tensors)
    torch.testing.assert_close(
        logits_of(fresh, batch), logits_of(learner.model, batch), atol=0, rtol=0
    )


def test_save_final_is_an_hf_model_directory(tiny_dirs, tmp_path):
    learner = Learner(make_config(tiny_dirs))
    batch = make_batch(tiny_dirs)
    learner.train(batch)
    learner.save_final(str(tmp_path / "final"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    torch.testing.assert_close(
        logits_of(loaded, batch), logits_of(learner.model, batch), atol=0, rtol=0
    )
    assert (tmp_path / "final" / "tokenizer.json").exists()


def test_save_final_merges_lora(tiny_dirs, tmp_path):
    learner = Learner(make_config(tiny_dirs, lora=True))
    batch = make_batch(tiny_dirs)
    learner.train(batch)
    learner.save_final(str(tmp_path / "final"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert not any("lora_" in name for name, _ in loaded.named_parameters())
    torch.testing.assert_close(
        logits_of(loaded, batch), logits_of(learner.model, batch), atol=1e-5, rtol=0
    )


def test_save_final_without_merge_is_a_peft_adapter_directory(tiny_dirs, tmp_path):
    config = make_config(tiny_dirs, lora=True)
    config = config.model_copy(
        update={
            "student": config.student.model_copy(
                update={"lora": config.student.lora.model_copy(update={"merge_on_save": False})}
            )
        }
    )
    learner = Learner(config)
    batch = make_batch(tiny_dirs)
    learner.train(batch)
    learner.save_final(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # base from the student path
    torch.testing.assert_close(
        logits_of(loaded, batch), logits_of(learner.model, batch), atol=1e-6, rtol=0
    )


# -- checkpoints ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "zero_stage, lora",
    [(0, False), (2, False), zero3_slow(3, False), (0, True), zero3_slow(3, True)],
)
def test_checkpoint_resumes_exactly(tiny_dirs, tmp_path, zero_stage, lora):
    options = {
        "zero_stage": zero_stage,
        "lr_schedule": "cosine",
        "warmup_steps": 1,
        "micro_batch_size": 2,
    }
    batches = [make_batch(tiny_dirs, seed=s) for s in range(3)]
    original = Learner(make_config(tiny_dirs, lora=lora, **options))
    original.train(batches[0]), original.train(batches[1])
    original.save_checkpoint(str(tmp_path / "ckpt"))
    expected_metrics = original.train(batches[2])

    resumed = Learner(make_config(tiny_dirs, lora=lora, **options))
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    assert resumed.version == 2
    metrics = resumed.train(batches[2])

    assert_weights_equal(weights(resumed), weights(original))
    # Wall seconds and the process's peak memory are what a resume cannot reproduce; every
    # other metric must match.
    for key in ("learner/seconds", "memory/learner_peak_gib"):
        assert metrics.pop(key) > 0 and expected_metrics.pop(key) > 0
    assert metrics == expected_metrics
    assert resumed.version == original.version == 3


# -- data parallelism ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_parallel_rank(
    rank: int, config: Config, batch: RolloutBatch, port: int, out: str
) -> None:
    torch.set_num_threads(1)
    learner = Learner(config, rank=rank, world_size=2, master_port=port)
    rows = slice(0, 3) if rank == 0 else slice(3, None)  # uneven: rank 1 runs a padding pass
    metrics = learner.train(batch.replace(token_count=batch.num_response_tokens).select(rows))
    after_one_step = weights(learner)
    # A NaN on one rank only: every rank must skip the step.
    shard = batch.replace(token_count=batch.num_response_tokens).select(rows)
    if rank == 1:
        shard = shard.replace(teacher_logits=torch.full_like(shard.teacher_logits, math.nan))
    skipped = learner.train(shard)
    untouched = all(torch.equal(after_one_step[n], w) for n, w in weights(learner).items())
    torch.save(
        {"weights": after_one_step, "metrics": metrics, "skipped": skipped, "untouched": untouched},
        f"{out}/rank{rank}.pt",
    )


@pytest.mark.slow  # spawns two processes that rendezvous over torch.distributed
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_two_ranks_on_halves_equal_one_rank_on_the_whole_batch(tiny_dirs, tmp_path, zero_stage):
    # Two ranks sum the gradients in another order; Adam's first step (lr·g/(|g|+ε)) magnifies
    # that rounding by lr/ε for gradients near ε, so the 1e-6 tolerance needs a moderate lr
    # (at lr 1e-2, ZeRO-3 reached 1.3e-6 once the divergences' gradients were written out).
    config = make_config(tiny_dirs, zero_stage=zero_stage, micro_batch_size=1, lr=1e-3)
    batch = make_batch(tiny_dirs, rows=5)
    context = mp.spawn(
        _data_parallel_rank, args=(config, batch, _free_port(), str(tmp_path)), nprocs=2, join=False
    )
    deadline = time.monotonic() + 180
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("data-parallel ranks did not finish in 180 s")
    single = Learner(config)
    expected = single.train(batch)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in ranks:
        assert_weights_equal(result["weights"], weights(single), atol=1e-6)
        assert result["metrics"]["learner/grad_norm"] == pytest.approx(
            expected["learner/grad_norm"], rel=1e-5
        )
    summed = sum(r["metrics"]["learner/loss"] for r in ranks)
    assert summed == pytest.approx(expected["learner/loss"], rel=1e-5)
    for result in ranks:
        assert result["skipped"]["learner/skipped"] == 1.0 and result["untouched"]
        assert result["skipped"]["learner/version"] == 1.0


# -- numerics guard --------------------------------------------------------------------------
@pytest.mark.parametrize("zero_stage", [0, 2, zero3_slow(3)])
def test_an_update_that_overflows_the_weights_is_flagged_and_never_saved(
    tiny_dirs, tmp_path, zero_stage
):
    """lr=1e30 with weight decay 1e10 makes fp32 weights inf behind a finite gradient (AdamW
    decays by 1 - lr·wd): the step is applied, so the guard checks the weights after it."""
    learner = Learner(make_config(tiny_dirs, zero_stage=zero_stage, lr=1e30, weight_decay=1e10))
    metrics = learner.train(make_batch(tiny_dirs))
    assert metrics["learner/skipped"] == 0.0 and math.isfinite(metrics["learner/grad_norm"])
    assert metrics["learner/nonfinite_weights"] == 1.0
    with pytest.raises(ValueError, match="refusing to save .*final.*not finite"):
        learner.save_final(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()
    with pytest.raises(ValueError, match="not finite"):
        learner.save_checkpoint(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("zero_stage", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_an_lr_past_adamws_float32_range_is_refused_and_the_largest_allowed_one_steps(
    tiny_dirs, zero_stage
):
    """From lr = 3.4e37 torch's AdamW overflows converting its step size 10·lr to float32 (a
    RuntimeError mid-run); the config refuses it, and just below it steps still complete
    and the numerics guard sees what they did to the weights."""
    with pytest.raises(ConfigError, match="learner.lr: must be below 3.4e.37"):
        make_config(tiny_dirs, lr=3.5e37)
    learner = Learner(make_config(tiny_dirs, zero_stage=zero_stage, lr=3.3e37))
    for seed in range(2):  # the second step starts from the first one's huge weights
        metrics = learner.train(make_batch(tiny_dirs, seed=seed))
        flagged = metrics["learner/skipped"] or metrics["learner/nonfinite_weights"]
        weights_finite = all(p.isfinite().all() for p in learner.state_dict().values())
        assert flagged or weights_finite


def test_a_normal_update_keeps_the_weights_finite(tiny_dirs):
    metrics = Learner(make_config(tiny_dirs)).train(make_batch(tiny_dirs))
    assert metrics["learner/nonfinite_weights"] == 0.0
