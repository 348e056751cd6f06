"""KV distillation in the pipeline: the K-V teacher (layout, prefix alignment, several
teachers, the disk cache), `RolloutBatch.teacher_kv` on the wire, the `kv_distill` loss
against a brute-force computation, its trainable router, and exact checkpoint resume."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch

from protege.actors.kv_teacher import KVTeacherScorer
from protege.algorithms import build_algorithm
from protege.algorithms.registry import ModuleContext
from protege.kv.batch import make_batch
from protege.kv.extract import KVSpec, forward_kv, forward_sequences
from protege.kv.loss import answer_token_nll, kv_cosine_distance, kv_mse
from protege.kv.rope import apply_rope, undo_rope
from protege.modeling import load_model, load_tokenizer, resolve_path, sequence_inputs
from protege.records import RolloutBatch, RolloutPlan, concat
from protege.student import StudentForward

STUDENT, TEACHER, TEACHER_B = (
    "builtin:tiny/student",
    "builtin:tiny/teacher",
    "builtin:tiny/teacher_b",
)
KV = RolloutPlan(source="dataset", teacher_need="kv", kv_time_align="char")
ROWS = [("12+3=", "15"), ("47+38=", "85"), ("9+90=", "99")]


def student_batch(rows=ROWS, step: int = 0) -> RolloutBatch:
    """Prompts left-padded, completions (+ EOS) right-padded, as `dataset_batch` gives them."""
    tokenizer = load_tokenizer(STUDENT)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in rows]
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] + [1] for _, a in rows]
    width_p, width_t = max(map(len, prompts)), max(map(len, answers)) + 1
    prompt_ids = torch.zeros(len(rows), width_p, dtype=torch.long)
    response_ids = torch.zeros(len(rows), width_t, dtype=torch.long)
    for b, (p, a) in enumerate(zip(prompts, answers)):
        prompt_ids[b, width_p - len(p) :] = torch.tensor(p)
        response_ids[b, : len(a)] = torch.tensor(a)
    return RolloutBatch(prompt_ids, prompt_ids != 0, response_ids, response_ids != 0, step=step)


@pytest.fixture(scope="module")
def scorer_a():
    return KVTeacherScorer(TEACHER, student_tokenizer=STUDENT)


# -------------------------------------------------------------------------- the K-V teacher


def test_same_token_teacher_gives_unroped_keys_on_the_student_layout(scorer_a):
    batch = student_batch()
    kv = scorer_a.score(batch, KV).teacher_kv[0]
    ids, mask, positions = sequence_inputs(batch)
    spec = scorer_a.spec
    with torch.no_grad():
        own = forward_sequences(scorer_a.model, ids, mask, positions, spec).kv
    real = mask.bool()[:, None, :, None]
    for k, v, own_k, own_v in zip(kv.keys, kv.values, own.keys, own.values):
        assert k.shape == (3, spec.kv_heads, ids.shape[1], spec.head_dim)
        torch.testing.assert_close(k, undo_rope(own_k, positions, spec.rope) * real)
        torch.testing.assert_close(v, own_v * real)
        assert k.masked_select(~real).eq(0).all()  # padding (also mid-sequence) is zero


def test_prefixed_teacher_lands_on_the_students_real_positions():
    prefix = "1+1=2;"
    scorer = KVTeacherScorer(TEACHER, student_tokenizer=STUDENT, prefix=prefix)
    assert not scorer.same_tokens
    batch = student_batch()
    kv = scorer.score(batch, KV).teacher_kv[0]
    texts = [{"prompt": p, "completion": a + "<eos>"} for p, a in ROWS]
    teacher = make_batch(load_tokenizer(TEACHER), texts, prefix)
    with torch.no_grad():
        own = forward_kv(scorer.model, teacher, scorer.spec).kv
    own_k = undo_rope(own.keys[0], teacher.positions, scorer.spec.rope)
    real = sequence_inputs(batch)[1].bool()
    for b in range(batch.size):
        n = int(real[b].sum())  # one character per token: the suffix after the prefix
        torch.testing.assert_close(
            kv.keys[0][b][:, real[b]], own_k[b, :, len(prefix) : len(prefix) + n]
        )
        torch.testing.assert_close(
            kv.values[1][b][:, real[b]], own.values[1][b, :, len(prefix) : len(prefix) + n]
        )
        assert kv.keys[0][b][:, ~real[b]].eq(0).all()
    # segment alignment: the answer maps one-to-one, the longer prompt is resampled
    segment = scorer.score(batch, RolloutPlan(teacher_need="kv", kv_time_align="segment"))
    for b in range(batch.size):
        n, p = int(real[b].sum()), int(batch.prompt_mask[b].sum())
        answer = segment.teacher_kv[0].values[1][b][:, real[b]][:, p:]
        torch.testing.assert_close(answer, own.values[1][b, :, len(prefix) + p : len(prefix) + n])


def test_two_teachers_append_their_kv_in_order(scorer_a):
    scorer_b = KVTeacherScorer(TEACHER_B, student_tokenizer=STUDENT)
    scored = scorer_b.score(scorer_a.score(student_batch(), KV), KV)
    a, b = scored.teacher_kv
    assert (len(a.keys), a.keys[0].shape[1], a.keys[0].shape[3]) == (4, 2, 32)
    assert (len(b.keys), b.keys[0].shape[1], b.keys[0].shape[3]) == (3, 1, 16)
    assert scored.extras["teacher/seconds"] > 0


def test_caching_teacher_reads_rows_back_and_a_changed_model_invalidates(tmp_path):
    model_dir = tmp_path / "teacher"
    shutil.copytree(resolve_path(TEACHER), model_dir)
    cache = tmp_path / "cache"
    scorer = KVTeacherScorer(str(model_dir), student_tokenizer=STUDENT, cache_dir=str(cache))
    batch = student_batch()
    first = scorer.score(batch, KV)
    assert scorer.forward_rows == 3 and first.extras["teacher/kv_cache_hit_count"] == 0
    # a second epoch: the same rows in another order and padding, no teacher forward
    again = scorer.score(student_batch(ROWS[::-1]), KV)
    assert scorer.forward_rows == 3 and again.extras["teacher/kv_cache_hit_count"] == 3
    real_first = sequence_inputs(batch)[1].bool()
    real_again = sequence_inputs(again)[1].bool()
    for got, want in zip(again.teacher_kv[0].keys, first.teacher_kv[0].keys):
        for b in range(3):
            assert torch.equal(got[2 - b][:, real_again[2 - b]], want[b][:, real_first[b]])
    # a fresh worker on the same directory reads it too
    fresh = KVTeacherScorer(str(model_dir), student_tokenizer=STUDENT, cache_dir=str(cache))
    assert torch.equal(
        fresh.score(batch, KV).teacher_kv[0].values[2], first.teacher_kv[0].values[2]
    )
    assert fresh.forward_rows == 0
    # retrained weights at the same path: new keys, the teacher runs again
    (model_dir / "config.json").write_text((model_dir / "config.json").read_text() + "\n")
    changed = KVTeacherScorer(str(model_dir), student_tokenizer=STUDENT, cache_dir=str(cache))
    changed.score(batch, KV)
    assert changed.forward_rows == 3


# -------------------------------------------------------------------------- records


def test_teacher_kv_survives_pickling_select_and_concat(scorer_a):
    scored = scorer_a.score(student_batch(), KV)
    back = pickle.loads(pickle.dumps(scored))
    for x, y in zip(back.teacher_kv[0].keys, scored.teacher_kv[0].keys):
        assert torch.equal(x, y)
    parts = [
        scorer_a.score(student_batch(ROWS[:1]), KV),
        scorer_a.score(student_batch(ROWS[1:]), KV),
    ]
    whole = concat(parts)
    assert (
        whole.teacher_kv[0].keys[0].shape[2]
        == whole.prompt_ids.shape[1] + whole.response_ids.shape[1]
    )
    for b, (part, row) in enumerate([(parts[0], 0), (parts[1], 0), (parts[1], 1)]):
        real_whole = sequence_inputs(whole)[1].bool()[b]
        real_part = sequence_inputs(part)[1].bool()[row]
        for x, y in zip(whole.teacher_kv[0].values, part.teacher_kv[0].values):
            assert torch.equal(x[b][:, real_whole], y[row][:, real_part])
    assert torch.equal(whole.select([2]).teacher_kv[0].keys[1], whole.teacher_kv[0].keys[1][2:])


# -------------------------------------------------------------------------- the loss


def _modules(algorithm, teachers):
    student = load_model(STUDENT)
    context = ModuleContext(
        student.config, tuple(load_model(t).config for t in teachers), tuple(teachers), 0
    )
    return student, torch.nn.ModuleDict(algorithm.modules(context))


@pytest.mark.parametrize("step", [0, 5])
def test_loss_equals_a_brute_force_computation(step):
    """A same-shaped teacher (the student's own architecture: identity projector), one
    teacher, fixed fusion; during the warm-up only the shallow layer counts."""
    params = {"name": "kv_distill", "fusion": "fixed", "beta": 0.3, "delta": 0.2}
    algorithm = build_algorithm({**params, "layer_warmup_steps": 3, "lambda_v": 0.5})
    student, modules = _modules(algorithm, [STUDENT])
    scored = KVTeacherScorer(STUDENT, student_tokenizer=STUDENT).score(student_batch(step=step), KV)
    loss, metrics = algorithm.loss(StudentForward(student, scored, modules, student.config), scored)

    ids, mask, positions = sequence_inputs(scored)
    spec = KVSpec.from_config(student.config)
    out = forward_sequences(student, ids, mask, positions, spec)
    per_layer = []
    for layer in range(spec.layers):
        target_k = apply_rope(scored.teacher_kv[0].keys[layer], positions, spec.rope)
        target_v = scored.teacher_kv[0].values[layer]
        k, v = out.kv.keys[layer], out.kv.values[layer]
        cos = 0.5 * (kv_cosine_distance(k, target_k, mask) + kv_cosine_distance(v, target_v, mask))
        per_layer.append(kv_mse(k, target_k, mask) + 0.5 * kv_mse(v, target_v, mask) + 0.3 * cos)
    kv_loss = per_layer[0] if step < 3 else (per_layer[0] + per_layer[1]) / 2
    answer_mask = torch.cat([torch.zeros_like(scored.prompt_mask), scored.response_mask], 1)
    nll, nll_mask = answer_token_nll(out.logits, ids, answer_mask)
    ce = (nll * nll_mask).sum() / scored.response_mask.sum()
    torch.testing.assert_close(loss, kv_loss + 0.2 * ce)
    assert metrics["kv/ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert metrics["kv/loss"] == pytest.approx(kv_loss.item(), rel=1e-5)


def test_micro_batches_add_up_and_the_router_gets_gradients(scorer_a):
    algorithm = build_algorithm(
        {"name": "kv_distill", "fusion": "router", "per_layer_router": True}
    )
    student, modules = _modules(algorithm, [TEACHER, TEACHER_B])
    scorer_b = KVTeacherScorer(TEACHER_B, student_tokenizer=STUDENT)
    scored = scorer_b.score(scorer_a.score(student_batch(), KV), KV)
    loss, metrics = algorithm.loss(StudentForward(student, scored, modules, student.config), scored)
    loss.backward()
    router = modules["kv"].router.net[-1].weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    assert 0 < metrics["kv/route_entropy"] <= 0.6932
    total = {}
    for part in scored.split(1):
        part_loss, part_metrics = algorithm.loss(
            StudentForward(student, part, modules, student.config), part
        )
        for key, value in {"loss": part_loss.item(), **part_metrics}.items():
            total[key] = total.get(key, 0.0) + value
    # CE adds up exactly; KV means weighted by their response-token shares approximately
    assert total["kv/ce"] == pytest.approx(metrics["kv/ce"], rel=1e-5)
    assert total["loss"] == pytest.approx(loss.item(), rel=0.1)


def test_control_arm_reads_no_teacher():
    control = build_algorithm({"name": "kv_distill", "distill": False})
    assert control.plan(0).teacher_need == "none" and control.plan(0).source == "dataset"
    assert control.modules(ModuleContext(None)) == {}
    assert build_algorithm({"name": "kv_distill"}).plan(7).teacher_need == "kv"
    with pytest.raises(ValueError, match="algorithm.delta"):
        build_algorithm({"name": "kv_distill", "distill": False, "delta": 0.0})


def test_cka_layer_map_is_calibrated_on_training_rows():
    algorithm = build_algorithm({"name": "kv_distill", "layer_map": "cka", "cka_rows": 16})
    context = ModuleContext(
        load_model(STUDENT).config,
        (load_model(TEACHER).config,),
        ("a",),
        student_model=STUDENT,
        teacher_models=(TEACHER,),
        train_data="builtin:tiny/train",
    )
    (layer_map,) = algorithm.modules(context)["kv"].layer_maps
    assert len(layer_map) == 2  # one entry per student layer
    for entry in layer_map:
        assert len(entry) == 2 and sum(w for _, w in entry) == pytest.approx(1.0)
        assert all(0 <= t < 4 for t, _ in entry)


# -------------------------------------------------------------------------- the pipeline


def _run(tmp_path, steps: int, **trainer):
    from protege.config import load_config
    from protege.run import build_controller

    overrides = [
        "trainer.workers=local",
        f"trainer.steps={steps}",
        "trainer.batch_size=8",
        "data.test=null",
        "logging.wandb=disabled",
        "logging.progress=false",
        f"output_dir={tmp_path}",
        "algorithm.layer_warmup_steps=2",
        *(f"trainer.{k}={v}" for k, v in trainer.items()),
    ]
    rows = []
    build_controller(load_config("kv_distill", overrides)).run(lambda k, row: rows.append(row))
    return rows


@pytest.mark.slow
def test_controller_trains_and_resumes_exactly(tmp_path):
    straight = _run(tmp_path / "straight", 4)
    assert straight[-1]["kv/loss"] < straight[0]["kv/loss"]
    assert straight[-1]["teacher/kv_cache_hit_count"] == 0  # 8 x 4 rows of 2000: no repeats
    _run(tmp_path / "resumed", 2, save_every=2)
    resumed = _run(tmp_path / "resumed", 4, save_every=2, resume="true")
    assert [r["step"] for r in resumed] == [2, 3]
    for want, got in zip(straight[2:], resumed):
        for key in ("learner/loss", "kv/loss", "kv/ce", "kv/route_entropy", "learner/grad_norm"):
            assert got[key] == want[key], key
