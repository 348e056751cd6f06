"""Start-up checks and report of a run whose teacher has another tokenizer."""

from __future__ import annotations

from protege.errors import SetupError
from protege.modeling import load_tokenizer
from protege.xtok.align import aligned_characters
from protege.xtok.scorer import teacher_view
from protege.xtok.vocab import vocabulary_map

REPORT_ROWS = 256  # training completions the start-up report aligns


def check_cross_tokenizer(config, method: str) -> None:
    """What the cross-tokenizer path cannot serve, refused before any model loads."""
    for spec in config.teachers:
        if spec.is_self:
            raise SetupError(
                f"algorithm.cross_tokenizer={method} needs a teacher model with its own "
                "tokenizer; the self-teacher ('self') shares the student's: set "
                "algorithm.cross_tokenizer=none"
            )
        if spec.backend != "hf":
            raise SetupError(
                f"teacher {spec.name!r}: algorithm.cross_tokenizer={method} runs on the HF "
                f"teacher backend only, got teacher.backend={spec.backend}; set "
                "teacher.backend=hf"
            )
    if config.trainer.eval_teacher_kl:
        raise SetupError(
            "trainer.eval_teacher_kl measures the teacher's log-probs of the student's own "
            f"tokens, which a teacher read through algorithm.cross_tokenizer={method} does not "
            "give; set trainer.eval_teacher_kl=false"
        )


def cross_tokenizer_report(student_tok, teacher_name: str, teacher_model: str, rows) -> str:
    """One line: the vocabularies' overlap, and on the first training completions the share
    of response characters in aligned spans and in exact one-token spans. `rows` are
    `protege.data.Row`s (prompt, completion)."""
    teacher_tok = load_tokenizer(teacher_model)
    pairs = vocabulary_map(student_tok, teacher_tok)
    line = (
        f"teacher {teacher_name!r} ({teacher_model}) is read across tokenizers: {pairs.summary()}"
    )
    texts = [r for r in rows if isinstance(r.completion, str)][:REPORT_ROWS]
    if not texts:
        return line + "; no data.train completions to measure the span alignment on"
    total = aligned = exact = 0
    for row in texts:
        prompt = student_tok(row.prompt, add_special_tokens=False)["input_ids"]
        response = student_tok(row.completion, add_special_tokens=False)["input_ids"]
        view = teacher_view(student_tok, teacher_tok, prompt, response)
        total += view.characters
        aligned += aligned_characters(view.spans)
        exact += aligned_characters(view.spans, exact_only=True)
    return (
        f"{line}; on {len(texts)} data.train completions {aligned / max(total, 1):.0%} of "
        f"response characters lie in aligned spans, {exact / max(total, 1):.0%} in exact "
        "one-token spans (compared over paired ids; other spans by their text's probability)"
    )
