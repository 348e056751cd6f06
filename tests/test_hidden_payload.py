"""`teacher_need="hidden"`: the teacher ships the input of its output head, the learner
decodes it with a frozen copy of the head — and every divergence, every algorithm loss and
a whole GKD run come out as with full teacher logits (fp32)."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from test_algorithms import ALL_VARIANTS, make_algorithm  # the registry's variants
from test_algorithms import make_batch as synthetic_batch
from transformers import AutoModelForCausalLM, Qwen2Config

from protege import capabilities as cap
from protege.actors.teacher import TeacherScorer, payload_bytes
from protege.algorithms.divergences import forward_kl, generalized_jsd, reverse_kl
from protege.algorithms.teacher_view import paired_logprobs
from protege.config import config_from_dict, load_config
from protege.cpu_bf16 import compute_dtype
from protege.errors import SetupError
from protege.records import RolloutBatch, RolloutPlan, concat
from protege.run import build_controller, check_setup
from protege.student import StudentLogits
from protege.tasks.tiny_models import build_tiny_model
from protege.teacher_head import TeacherHead

FULL, HIDDEN = RolloutPlan(teacher_need="full"), RolloutPlan(teacher_need="hidden")
BIG_VOCAB = 49_152


def random_model_dir(root, vocab: int, tied: bool, seed: int = 0) -> str:
    """A random-weight Qwen2 of a real vocabulary size, otherwise tiny (fast on CPU)."""
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    path = root / f"qwen2_v{vocab}_{'tied' if tied else 'untied'}"
    build_tiny_model(config, seed).save_pretrained(path)
    return str(path)


def random_batch(vocab: int, rows: int = 3, prompt: int = 4, response: int = 5) -> RolloutBatch:
    """Right-padded responses of lengths response, 1 and 3 under left-padded prompts."""
    g = torch.Generator().manual_seed(vocab)
    prompt_mask = torch.ones(rows, prompt, dtype=torch.bool)
    prompt_mask[1, :2] = False
    mask = torch.arange(response) < torch.tensor([response, 1, 3])[:rows, None]
    ids = torch.randint(0, vocab, (rows, response), generator=g).masked_fill(~mask, 0)
    prompt_ids = torch.randint(0, vocab, (rows, prompt), generator=g).masked_fill(~prompt_mask, 0)
    return RolloutBatch(prompt_ids, prompt_mask, ids, mask)


@pytest.fixture(scope="module")
def models(tiny_dirs, tmp_path_factory) -> dict[str, tuple[str, RolloutBatch, int]]:
    """name -> (teacher dir, batch, student vocabulary): the tiny task's tied-embedding
    teacher (V = 30), a 49,152-token untied one, and the same vocabulary padded by 64 rows
    in the teacher (the student keeps 49,152, as Qwen-style pairs do)."""
    root = tmp_path_factory.mktemp("hidden")
    big = random_model_dir(root, BIG_VOCAB, tied=False)
    padded = random_model_dir(root, BIG_VOCAB + 64, tied=True, seed=1)
    return {
        "tiny": (tiny_dirs["teacher"], random_batch(30), 30),
        "49k": (big, random_batch(BIG_VOCAB), BIG_VOCAB),
        "49k_padded": (padded, random_batch(BIG_VOCAB), BIG_VOCAB),
    }


def scored(teacher_dir: str, batch: RolloutBatch) -> tuple[RolloutBatch, RolloutBatch]:
    """(full-logits batch, hidden-states batch decoded by the learner-side head)."""
    scorer = TeacherScorer(teacher_dir, micro_batch_size=2)
    full, hidden = scorer.score(batch, FULL), scorer.score(batch, HIDDEN)
    return full, TeacherHead.load(teacher_dir).decode(hidden)


@pytest.mark.parametrize("name", ["tiny", "49k", "49k_padded"])
def test_divergences_from_hidden_states_equal_those_from_full_logits(models, name):
    teacher_dir, batch, student_vocab = models[name]
    full, decoded = scored(teacher_dir, batch)
    mask = batch.response_mask
    assert decoded.teacher_hidden is None and decoded.teacher_logits.dtype == torch.float32
    torch.testing.assert_close(
        decoded.teacher_logits[mask], full.teacher_logits[mask], atol=1e-5, rtol=0
    )
    student = 3.0 * torch.randn(*mask.shape, student_vocab, generator=torch.Generator())
    for temperature in (1.0, 2.0):
        pairs = [paired_logprobs(student, b, temperature) for b in (full, decoded)]
        divergences = [
            (forward_kl, ()),
            (reverse_kl, ()),
            *[(generalized_jsd, (beta,)) for beta in (0.1, 0.5, 0.9)],
        ]
        for divergence, args in divergences:
            want, got = (divergence(s, t, *args) for s, t in pairs)  # log-probs in
            torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)
    assert pairs[0][1].shape[-1] == min(student_vocab, full.teacher_logits.shape[-1])


def test_hidden_states_are_the_head_input_and_cost_d_bytes_per_token(tiny_dirs):
    batch = random_batch(30)
    scorer = TeacherScorer(tiny_dirs["teacher"], micro_batch_size=2)
    out = scorer.score(batch, HIDDEN)
    width = scorer.model.config.hidden_size
    assert out.teacher_hidden.shape == (*batch.response_ids.shape, width)
    assert out.teacher_hidden.dtype == torch.float32  # the teacher's dtype: exact
    assert (out.teacher_hidden[~batch.response_mask] == 0).all()
    assert out.teacher_logits is None and out.teacher_topk_ids is None
    full = scorer.score(batch, FULL)
    torch.testing.assert_close(out.teacher_logprobs, full.teacher_logprobs, atol=0, rtol=0)
    tokens = batch.response_ids.numel()
    assert payload_bytes(out) == tokens * (4 + 4 * width)
    # bf16 teacher: states in the dtype its own head reads them (float32 on a CPU that only
    # stores bfloat16: protege.cpu_bf16); the learner's head of it decodes them to its logits
    bf16_teacher = TeacherScorer(tiny_dirs["teacher"], dtype="bfloat16")
    bf16 = bf16_teacher.score(batch, HIDDEN)
    read_as = compute_dtype(torch.bfloat16, "cpu")
    assert bf16.teacher_hidden.dtype == read_as
    assert payload_bytes(bf16) == tokens * (4 + read_as.itemsize * width)
    head = TeacherHead.load(tiny_dirs["teacher"], "bfloat16")
    decoded = head.decode(bf16).teacher_logits
    mask = batch.response_mask
    own = bf16_teacher.score(batch, FULL).teacher_logits
    exact = 1e-5 if read_as == torch.float32 else 2e-2
    torch.testing.assert_close(decoded[mask], own[mask], atol=exact, rtol=exact)
    torch.testing.assert_close(decoded[mask], full.teacher_logits[mask], atol=0.1, rtol=0.05)
    # hidden rows travel and concatenate like every other per-row field
    halves = concat([out.select(slice(0, 1)), out.select(slice(1, 3))])
    assert torch.equal(halves.teacher_hidden, out.teacher_hidden)


def test_head_is_read_from_the_right_tensor_tied_untied_or_with_a_bias(models, tmp_path):
    from transformers import PhiConfig

    tied_dir = models["tiny"][0]
    untied_dir = models["49k"][0]
    phi = PhiConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    biased_dir = str(tmp_path / "phi")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(phi)
    torch.nn.init.normal_(model.lm_head.bias)  # a bias that matters
    model.save_pretrained(biased_dir)
    for path in (tied_dir, untied_dir, biased_dir):
        reference = AutoModelForCausalLM.from_pretrained(path).get_output_embeddings()
        head = TeacherHead.load(path)
        assert torch.equal(head.weight, reference.weight), path
        assert (head.bias is None) == (reference.bias is None), path
        if head.bias is not None:
            assert torch.equal(head.bias, reference.bias)
    full, decoded = scored(biased_dir, random_batch(40))
    mask = decoded.response_mask
    torch.testing.assert_close(
        decoded.teacher_logits[mask], full.teacher_logits[mask], atol=1e-5, rtol=0
    )


def test_decoding_is_chunked_over_tokens_without_changing_a_value(models, monkeypatch):
    from protege import teacher_head

    teacher_dir, batch, _ = models["49k"]
    hidden = TeacherScorer(teacher_dir).score(batch, HIDDEN)
    head = TeacherHead.load(teacher_dir)
    whole = head.decode(hidden).teacher_logits
    for tokens in (1, 2, 5):  # a matmul of `tokens` rows at a time; 9 real tokens in all
        monkeypatch.setattr(teacher_head, "CHUNK_ELEMENTS", tokens * BIG_VOCAB)
        chunked = head.decode(hidden).teacher_logits  # GEMM blocking may round differently
        torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)


def test_a_head_of_another_width_is_refused(models):
    tiny_dir, batch, _ = models["tiny"]
    hidden = TeacherScorer(tiny_dir).score(batch, HIDDEN)
    with pytest.raises(ValueError, match="same model"):
        TeacherHead.load(models["49k"][0]).decode(hidden)


def test_undecoded_hidden_states_are_refused_by_the_loss(models):
    tiny_dir, batch, _ = models["tiny"]
    hidden = TeacherScorer(tiny_dir).score(batch, HIDDEN)
    with pytest.raises(ValueError, match="no teacher head decoded"):
        paired_logprobs(torch.zeros(*batch.response_ids.shape, 30), hidden)


def test_a_teacher_with_logit_softcapping_is_refused(tmp_path, tiny_dirs):
    from transformers import Gemma2Config

    config = Gemma2Config(
        vocab_size=30,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        final_logit_softcapping=0.5,  # small: changes the random model's logits visibly
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gemma2")
    scorer = TeacherScorer(str(tmp_path / "gemma2"))
    batch = random_batch(30)
    assert scorer.score(batch, FULL).teacher_logits is not None
    with pytest.raises(ValueError, match="teacher_output=full"):
        scorer.score(batch, HIDDEN)


# ------------------------------------------------------------------ every algorithm

FULL_VARIANTS = [p for p in ALL_VARIANTS if p.values[1].get("teacher_output") == "full"]


@pytest.mark.parametrize("name,kwargs", FULL_VARIANTS)
def test_every_algorithm_gives_the_same_loss_and_gradient_from_hidden_states(name, kwargs):
    full_algorithm = make_algorithm(name, kwargs)
    hidden_algorithm = make_algorithm(name, {**kwargs, "teacher_output": "hidden"})
    assert hidden_algorithm.plan(0).teacher_need == "hidden"
    logits, batch = synthetic_batch(full_algorithm, seed=5)
    batch = full_algorithm.advantages(batch)  # once: some estimators keep a running baseline
    g = torch.Generator().manual_seed(7)
    width = 7  # d < V, as in real teachers
    weight = torch.randn(batch.teacher_logits.shape[-1], width, generator=g)
    states = torch.randn(*batch.response_ids.shape, width, generator=g)
    as_full = batch.replace(teacher_logits=F.linear(states, weight))
    shipped = states.masked_fill(~batch.response_mask.unsqueeze(-1), 0)
    as_hidden = TeacherHead(weight).decode(
        batch.replace(teacher_logits=None, teacher_hidden=shipped)
    )
    results = []
    for algorithm, view in ((full_algorithm, as_full), (hidden_algorithm, as_hidden)):
        student = logits.detach().clone().requires_grad_(True)
        loss, metrics = algorithm.loss(StudentLogits(student), view)
        loss.backward()
        results.append((loss, metrics, student.grad))
    (want, want_metrics, want_grad), (got, got_metrics, got_grad) = results
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=0)
    assert got_metrics.keys() == want_metrics.keys()
    for key in want_metrics:
        assert got_metrics[key] == pytest.approx(want_metrics[key], abs=1e-5), key


# ------------------------------------------------------------------ runs and refusals


def run_rows(preset: str, output_dir, *overrides: str) -> list[dict]:
    """The metrics rows with a learner loss of an in-process run of `preset`."""
    local = ["trainer.workers=local", "logging.wandb=disabled", "logging.progress=false"]
    config = load_config(preset, [*local, f"output_dir={output_dir}", *overrides])
    build_controller(config).run()
    with open(f"{config.output_dir}/metrics.jsonl") as lines:
        return [row for row in map(json.loads, lines) if "learner/loss" in row]


@pytest.mark.slow
def test_gkd_run_with_hidden_states_matches_the_run_with_full_logits(tmp_path):
    common = ["trainer.steps=3", "trainer.batch_size=4", "data.test=null"]
    rows = {
        output: run_rows(
            "gkd",
            tmp_path / output,
            *common,
            "learner.micro_batch_size=2",  # several micro-batches decode apiece
            f"algorithm.teacher_output={output}",
        )
        for output in ("full", "hidden")
    }
    assert [r["step"] for r in rows["hidden"]] == [0, 1, 2]
    for full, hidden in zip(rows["full"], rows["hidden"]):
        assert hidden["learner/loss"] == pytest.approx(full["learner/loss"], rel=1e-5, abs=1e-6)
        assert hidden["gkd/jsd"] == pytest.approx(full["gkd/jsd"], rel=1e-5, abs=1e-6)
        # tiny task: d = 128 > V = 30, so hidden states are the bigger payload here
        tokens = hidden["teacher/tokens"]
        assert hidden["teacher/payload_bytes"] / tokens > full["teacher/payload_bytes"] / tokens


def test_head_stays_out_of_the_trained_and_exported_weights(tiny_dirs):
    from protege.actors.learner import Learner

    tree = {
        "student": {"model": tiny_dirs["student"]},
        "teacher": {"model": tiny_dirs["teacher"]},
        "learner": {"micro_batch_size": 2},
        "algorithm": {"name": "gkd", "teacher_output": "hidden"},
        "data": {"train": "builtin:tiny/train"},
    }
    learner = Learner(config_from_dict(tree))
    before = set(learner.export_weights().tensors)
    batch = TeacherScorer(tiny_dirs["teacher"]).score(random_batch(30), HIDDEN)
    metrics = learner.train(batch)
    assert metrics["learner/skipped"] == 0 and metrics["learner/loss"] > 0
    head = learner.teacher_head
    assert not head.weight.requires_grad and len(learner.algorithm_modules) == 0
    assert set(learner.export_weights().tensors) == before
    assert all(p is not head.weight for p in learner.model.parameters())


@pytest.mark.parametrize(
    "overrides,text",
    [
        (["teacher.backend=vllm"], "pooling-mode"),
        (["teacher.model=self", "student.lora.enabled=true"], cap.HIDDEN_NOT_FROM_SELF_TEACHER),
    ],
    ids=["vllm_teacher", "self_teacher"],
)
def test_hidden_with_a_teacher_that_cannot_ship_it_is_refused(overrides, text, tmp_path):
    config = load_config(
        "gkd", ["algorithm.teacher_output=hidden", f"output_dir={tmp_path}", *overrides]
    )
    with pytest.raises(SetupError, match="teacher_output") as refused:
        check_setup(config, config.build_algorithm())
    assert text in str(refused.value)


def test_records_round_trip_hidden_states(tiny_dirs, tmp_path):
    from protege.rollout_files import _join, _split

    out = TeacherScorer(tiny_dirs["teacher"], dtype="bfloat16").score(random_batch(30), HIDDEN)

    again = pickle.loads(pickle.dumps(out, protocol=5))
    assert torch.equal(again.teacher_hidden, out.teacher_hidden)
    tensors: dict = {}
    fields = json.loads(json.dumps(_split(out, "x", tensors)))
    restored = _join(RolloutBatch, fields, tensors)
    assert restored.teacher_hidden.dtype == compute_dtype(torch.bfloat16, "cpu")
    assert dataclasses.fields(restored) and torch.equal(restored.teacher_hidden, out.teacher_hidden)
