"""Cross-tokenizer distillation (protege.xtok): span alignment, vocabulary pairs, the GOLD
and ULD losses against brute-force definitions, and the same-tokenizer limit."""

from __future__ import annotations

import math

import pytest
import torch

from protege.actors.teacher import TeacherScorer
from protege.algorithms.cross_tokenizer import cross_tokenizer_loss, sorted_distance
from protege.algorithms.gkd import GKD
from protege.algorithms.registry import FieldError
from protege.kv.time_align import char_alignment_matrix
from protege.modeling import load_model, load_tokenizer
from protege.records import RolloutBatch, RolloutPlan
from protege.student import StudentForward
from protege.xtok.align import Span, aligned_spans, piece_offsets
from protege.xtok.vocab import vocabulary_map

ROWS = [
    ("7+11=", "18<eos>"),
    ("47+38=", "85<eos>"),
    ("50+50=", "100<eos>"),
    ("3+4=", "7<eos>"),
    ("12+1=", "13"),
    ("9+9=", "<eos>"),
]  # a truncated response, an EOS-only response


@pytest.fixture(scope="module")
def bpe_teacher(tmp_path_factory, tiny_dirs) -> str:
    """A random tiny teacher with a BPE tokenizer learnt on the task's text."""
    from transformers import LlamaForCausalLM

    from protege.tasks.tiny import make_rows
    from protege.tasks.tiny_bpe import bpe_teacher_config, train_bpe_tokenizer

    rows = make_rows(5000, 5)
    tokenizer = train_bpe_tokenizer(t for r in rows for t in (r["prompt"], r["answer"]))
    torch.manual_seed(9)
    model = LlamaForCausalLM(bpe_teacher_config(tokenizer, (2, 32, 2, 1, 64)))
    path = tmp_path_factory.mktemp("bpe_teacher")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def student_batch(tokenizer, rows=ROWS) -> RolloutBatch:
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in rows]
    responses = [tokenizer(c, add_special_tokens=False)["input_ids"] for _, c in rows]
    wp, wr = max(map(len, prompts)), max(map(len, responses))
    pid, pmask = (
        torch.zeros(len(rows), wp, dtype=torch.long),
        torch.zeros(len(rows), wp, dtype=torch.bool),
    )
    rid, rmask = (
        torch.zeros(len(rows), wr, dtype=torch.long),
        torch.zeros(len(rows), wr, dtype=torch.bool),
    )
    for b, (p, r) in enumerate(zip(prompts, responses)):
        pid[b, wp - len(p) :], pmask[b, wp - len(p) :] = torch.tensor(p), True
        rid[b, : len(r)], rmask[b, : len(r)] = torch.tensor(r), True
    return RolloutBatch(pid, pmask, rid, rmask)


# -- alignment ---------------------------------------------------------------------------


def test_spans_of_hand_made_tokenizations():
    # "18" + EOS: student "1","8",<eos>; teacher "18",</s> (EOS given one virtual character)
    assert aligned_spans([(0, 1), (1, 2), (2, 3)], [(0, 2), (2, 3)]) == [
        Span(0, 2, 0, 1, 0, 2),
        Span(2, 1, 1, 1, 2, 3),
    ]
    # "100": student "10","0" vs teacher "1","00": one 2:2 span, nothing exact
    assert aligned_spans([(0, 2), (2, 3)], [(0, 1), (1, 3)]) == [Span(0, 2, 0, 2, 0, 3)]
    # identical tokenizations: every token is an exact span
    same = aligned_spans([(0, 1), (1, 3)], [(0, 1), (1, 3)])
    assert [s.exact for s in same] == [True, True]
    # a zero-length token joins the span it sits in
    assert aligned_spans([(0, 1), (1, 1), (1, 2)], [(0, 1), (1, 2)]) == [
        Span(0, 2, 0, 1, 0, 1),
        Span(2, 1, 1, 1, 1, 2),
    ]
    # texts that disagree at the end: spans stop at the last shared boundary
    assert aligned_spans([(0, 1), (1, 3)], [(0, 1), (1, 2)]) == [Span(0, 1, 0, 1, 0, 1)]
    assert aligned_spans([], [(0, 1)]) == []


def _overlap_components(student, teacher) -> list[tuple[list[int], list[int]]]:
    """Brute force: groups of tokens linked by overlapping characters (char IoU > 0)."""
    linked = char_alignment_matrix(student, teacher) > 0
    groups, seen = [], set()
    for s in range(len(student)):
        if s in seen:
            continue
        ours, theirs, frontier = {s}, set(), [("s", s)]
        while frontier:
            side, i = frontier.pop()
            row = linked[i] if side == "s" else linked[:, i]
            for j in row.nonzero().flatten().tolist():
                target = theirs if side == "s" else ours
                if j not in target:
                    target.add(j)
                    frontier.append(("t" if side == "s" else "s", j))
        seen |= ours
        groups.append((sorted(ours), sorted(theirs)))
    return groups


def _cuts(length: int, rng: torch.Generator) -> list[int]:
    """Random token ends of a text of `length` characters (the last one always)."""
    ends = torch.randint(1, length + 1, (length,), generator=rng).tolist()
    return sorted(set(ends) | {length})


def test_spans_are_the_char_iou_components():
    """On random segmentations of one text, the spans are exactly the groups that
    protege.kv's char-IoU matrix links."""
    rng = torch.Generator().manual_seed(0)
    for _ in range(50):
        length = int(torch.randint(1, 12, (1,), generator=rng))
        s_cuts, t_cuts = _cuts(length, rng), _cuts(length, rng)
        student = list(zip([0, *s_cuts[:-1]], s_cuts))
        teacher = list(zip([0, *t_cuts[:-1]], t_cuts))
        spans = aligned_spans(student, teacher)
        expected = _overlap_components(student, teacher)
        got = [
            (
                list(range(s.student, s.student + s.student_len)),
                list(range(s.teacher, s.teacher + s.teacher_len)),
            )
            for s in spans
        ]
        assert got == expected, (student, teacher)


def test_piece_offsets():
    assert piece_offsets(["1", "", "23"]) == [(0, 1), (1, 1), (1, 3)]


# -- vocabulary pairs --------------------------------------------------------------------


def test_vocabulary_pairs_against_brute_force(tiny_dirs, bpe_teacher):
    student, teacher = load_tokenizer(tiny_dirs["student"]), load_tokenizer(bpe_teacher)
    pairs = vocabulary_map(student, teacher)
    got = set(zip(pairs.student_ids.tolist(), pairs.teacher_ids.tolist()))
    expected = {(student.eos_token_id, teacher.eos_token_id)}
    taken_s, taken_t = {student.eos_token_id}, {teacher.eos_token_id}
    for s in range(len(student)):
        for t in range(len(teacher)):
            same = student.decode([s]) == teacher.decode([t])
            if same and s not in taken_s and t not in taken_t:
                expected.add((s, t))
                taken_s.add(s)
                taken_t.add(t)
    assert got == expected
    assert {student.decode([s]) for s, _ in got} >= set("0123456789+=")
    assert len({s for s, _ in got}) == len(got) == len({t for _, t in got})  # one-to-one


# -- losses against brute force ----------------------------------------------------------


def _brute_force(student_tok, teacher_tok, teacher_model, batch, student_logits, method):
    """GOLD forward KL (β = 0) or ULD summed over aligned spans, by explicit loops in float64
    on unpadded teacher forwards, divided by the response tokens."""
    pairs = {(student_tok.eos_token_id, teacher_tok.eos_token_id)}
    for s in range(len(student_tok)):
        for t in range(len(teacher_tok)):
            same = student_tok.decode([s]) == teacher_tok.decode([t])
            specials = s == student_tok.eos_token_id or t == teacher_tok.eos_token_id
            if same and not specials and all(s != a and t != b for a, b in pairs):
                pairs.add((s, t))
    total = 0.0
    q_all = torch.log_softmax(student_logits.double(), -1).exp()
    for b in range(batch.size):
        ids = batch.response_ids[b][batch.response_mask[b]].tolist()
        ends = bool(ids) and ids[-1] == student_tok.eos_token_id
        body = ids[:-1] if ends else ids
        pieces = [student_tok.decode([i]) for i in body]
        text = "".join(pieces)
        prompt = teacher_tok(
            student_tok.decode(batch.prompt_ids[b][batch.prompt_mask[b]].tolist()),
            add_special_tokens=False,
        )
        answer = teacher_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        t_ids, t_off = list(answer["input_ids"]), [tuple(o) for o in answer["offset_mapping"]]
        s_off = piece_offsets(pieces)
        if ends:
            t_ids.append(teacher_tok.eos_token_id)
            t_off.append((len(text), len(text) + 1))
            s_off.append((len(text), len(text) + 1))
        sequence = torch.tensor([prompt["input_ids"] + t_ids])
        with torch.no_grad():
            logits = teacher_model(input_ids=sequence).logits[0].double()
        p_all = torch.softmax(logits[len(prompt["input_ids"]) - 1 : -1], -1)  # predicts t_ids
        for ours, theirs in _overlap_components(s_off, t_off):
            s0, t0 = ours[0], theirs[0]
            q, p = q_all[b, s0], p_all[t0]
            if method == "uld":
                a = sorted(q.tolist(), reverse=True)
                c = sorted(p.tolist(), reverse=True)
                width = max(len(a), len(c))
                a, c = a + [0.0] * (width - len(a)), c + [0.0] * (width - len(c))
                total += sum(abs(x - y) for x, y in zip(a, c))
                continue
            exact = len(ours) == 1 and len(theirs) == 1
            if exact:
                qs = [float(q[s]) for s, _ in sorted(pairs)]
                ps = [float(p[t]) for _, t in sorted(pairs)]
                qs.append(1 - sum(qs))
                ps.append(1 - sum(ps))
            else:
                qx = math.prod(float(q_all[b, i, ids[i]]) for i in ours)
                px = math.prod(float(p_all[j, t_ids[j]]) for j in theirs)
                qs, ps = [qx, 1 - qx], [px, 1 - px]
            total += sum(pi * math.log(pi / qi) for pi, qi in zip(ps, qs) if pi > 0)
    return total / float(batch.response_mask.sum())


@pytest.mark.parametrize("method", ["gold", "uld"])
def test_losses_against_brute_force(tiny_dirs, bpe_teacher, method):
    student_tok, teacher_tok = load_tokenizer(tiny_dirs["student"]), load_tokenizer(bpe_teacher)
    scorer = TeacherScorer(bpe_teacher, student_tokenizer=tiny_dirs["student"], micro_batch_size=4)
    batch = student_batch(student_tok)
    plan = RolloutPlan(teacher_need="topk", topk=64, cross_tokenizer=method)
    scored = scorer.score(batch, plan)
    logits = torch.randn(
        batch.size,
        batch.response_ids.shape[1],
        len(student_tok),
        generator=torch.Generator().manual_seed(1),
    )
    loss, _ = cross_tokenizer_loss(logits, scored, method, beta=0.0, temperature=1.0)
    expected = _brute_force(student_tok, teacher_tok, scorer.model, batch, logits, method)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert (
        0 < scored.extras["xtok/exact_char_share"] < 1 == scored.extras["xtok/aligned_char_share"]
    )


def test_sorted_distance_against_brute_force():
    rng = torch.Generator().manual_seed(2)
    student = torch.softmax(torch.randn(3, 7, generator=rng), -1)
    teacher = torch.softmax(torch.randn(3, 11, generator=rng), -1)
    got = sorted_distance(student, teacher)
    for row in range(3):
        a = sorted(student[row].tolist(), reverse=True) + [0.0] * 4
        c = sorted(teacher[row].tolist(), reverse=True)
        assert float(got[row]) == pytest.approx(sum(abs(x - y) for x, y in zip(a, c)), abs=1e-6)
    assert float(sorted_distance(student, student).max()) == 0.0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_same_tokenizer_through_the_cross_path_gives_the_ordinary_loss(tiny_dirs, beta):
    """A teacher with the student's tokenizer: every span is exact and the pairs are the
    identity, so GOLD is GKD's ordinary JSD(β) to 1e-6."""
    tokenizer = load_tokenizer(tiny_dirs["student"])
    scorer = TeacherScorer(tiny_dirs["teacher"], student_tokenizer=tiny_dirs["student"])
    batch = student_batch(tokenizer)
    model = load_model(tiny_dirs["student"])
    losses = {}
    for method in ("none", "gold"):
        algorithm = GKD(beta=beta, cross_tokenizer=method)
        scored = scorer.score(batch, algorithm.plan(0))
        losses[method] = algorithm.loss(StudentForward(model, scored), scored)[0].item()
    assert losses["gold"] == pytest.approx(losses["none"], abs=1e-6, rel=1e-6)
    assert losses["none"] > 0


def test_cross_losses_backpropagate_finite_gradients_only_at_span_starts(tiny_dirs, bpe_teacher):
    student_tok = load_tokenizer(tiny_dirs["student"])
    scorer = TeacherScorer(bpe_teacher, student_tokenizer=tiny_dirs["student"])
    batch = student_batch(student_tok)
    for method in ("gold", "uld"):
        scored = scorer.score(
            batch, RolloutPlan(teacher_need="topk", topk=64, cross_tokenizer=method)
        )
        logits = torch.randn(
            batch.size, batch.response_ids.shape[1], len(student_tok), requires_grad=True
        )
        loss, _ = cross_tokenizer_loss(logits, scored, method, beta=0.5, temperature=1.5)
        loss.backward()
        assert torch.isfinite(logits.grad).all()
        touched = logits.grad.abs().sum(-1) > 0
        reachable = torch.zeros_like(touched)  # span starts, and (GOLD) tokens inside spans
        spans = scored.teacher_span_tokens
        for b, t in (spans > 0).nonzero().tolist():
            reachable[b, t : t + (int(spans[b, t]) if method == "gold" else 1)] = True
        assert not (touched & ~reachable).any()
        assert not touched[~batch.response_mask].any()


# -- refusals ----------------------------------------------------------------------------


def test_gkd_refuses_what_the_cross_path_cannot_serve():
    with pytest.raises(FieldError, match="seq_kd"):
        GKD(cross_tokenizer="gold", seq_kd=True)
    with pytest.raises(FieldError, match="teacher_output"):
        GKD(cross_tokenizer="uld", teacher_output="full")


def test_a_teacher_of_another_tokenizer_is_refused_without_cross_tokenizer(tiny_dirs, bpe_teacher):
    from protege.config import load_config
    from protege.errors import SetupError
    from protege.run import check_teacher_tokenizers

    tokenizer = load_tokenizer(tiny_dirs["student"])
    config = load_config(
        "minillm", [f"teacher.model={bpe_teacher}", "data.train=builtin:tiny/train"]
    )
    with pytest.raises(SetupError, match="cross_tokenizer=gold"):
        check_teacher_tokenizers(config, config.build_algorithm(), tokenizer, False)


def test_plain_scoring_by_a_cross_tokenizer_teacher_is_refused(tiny_dirs, bpe_teacher):
    scorer = TeacherScorer(bpe_teacher, student_tokenizer=tiny_dirs["student"])
    batch = student_batch(load_tokenizer(tiny_dirs["student"]))
    with pytest.raises(ValueError, match="tokenizer is not the student's"):
        scorer.score(batch, RolloutPlan(teacher_need="sampled"))


def test_cross_tokenizer_refuses_eval_teacher_kl_and_other_backends(tmp_path):
    from protege.config import load_config
    from protege.errors import SetupError
    from protege.run import check_setup

    for override, match in (
        ("trainer.eval_teacher_kl=true", "eval_teacher_kl"),
        ("teacher.backend=vllm", "backend"),
    ):
        config = load_config(
            "cross_tokenizer", [override, "trainer.eval_samples=1", f"output_dir={tmp_path}"]
        )
        with pytest.raises(SetupError, match=match):
            check_setup(config, config.build_algorithm())


def test_start_up_report_measures_overlap_and_aligned_characters(tiny_dirs, bpe_teacher):
    from protege.data import Row
    from protege.xtok.checks import cross_tokenizer_report

    rows = [Row(prompt=p, completion=c) for p, c in ROWS]
    line = cross_tokenizer_report(load_tokenizer(tiny_dirs["student"]), "t", bpe_teacher, rows)
    assert "tokens with the same string in both vocabularies" in line
    assert (
        f"on {len(ROWS)} data.train completions 100% of response characters lie in aligned spans"
        in line
    )
    # exact spans: 7, 13 (one token each side) and the EOS of 5 rows; not 18, 85, 100
    assert "% in exact one-token spans" in line


@pytest.mark.slow
def test_student_learns_from_a_teacher_with_another_tokenizer(tmp_path, capsys):
    """The example's preset (GOLD-style supervised KD from the BPE teacher) raises the weak
    student's accuracy; the start-up report names the vocabulary overlap."""
    from protege.config import load_config
    from protege.run import build_controller

    config = load_config(
        "cross_tokenizer",
        [
            "trainer.workers=local",
            "logging.wandb=disabled",
            "logging.progress=false",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    result = build_controller(config).run()
    assert "is read across tokenizers" in capsys.readouterr().err
    assert result["eval_after/accuracy"] >= result["eval_before/accuracy"] + 0.15, result


def test_cross_tokenizer_refuses_several_teachers_and_privileged_prompts(tmp_path):
    """The cross path re-reads the student's own text for one teacher: a second teacher
    (whose outputs would need fusing) and a privileged prompt are refused at start-up."""
    from protege.config import load_config
    from protege.errors import SetupError
    from protege.run import check_setup

    cases = (
        (["teachers.1.name=second", "teachers.1.model=builtin:tiny/teacher"], "reads one teacher"),
        (['teachers.0.prompt_template="{answer};{prompt}"'], "re-reads the student's own text"),
    )
    for overrides, match in cases:
        config = load_config("cross_tokenizer", [*overrides, f"output_dir={tmp_path}"])
        with pytest.raises(SetupError, match=match):
            check_setup(config, config.build_algorithm())
