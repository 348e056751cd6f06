"""The built-in tiny task: two-digit addition with exact-match answers (SPEC §5).

A row is `{"prompt": "47+38=", "completion": "85<eos>", "answer": "85"}`. The completion
carries the EOS token's text, so tokenising `prompt + completion` teaches the model to stop.
Shipped assets (see `scripts/build_tiny_assets.py`, which regenerates them):

* `teacher/` — 4 layers x 128 (~0.79 M parameters), ~100% greedy exact match on the test set;
* `student/` — 2 layers x 64 (~76 K parameters), SFT'd 300 steps on the first 300 rows of
  `train.jsonl` only: weak (~10%) but not zero, while the same shape reaches ~100% with
  plenty of gold data — room for distillation to show progress;
* `tokenizer/` — the character tokenizer (also saved inside each model directory);
* `train.jsonl` (2,000 rows), `test.jsonl` (200 held-out rows), `pretrain.txt` (worked
  examples for MiniLLM's language-modelling term); no test prompt appears in the others.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from protege.tasks.tiny_models import (
    EOS,
    SPECIAL_TOKENS,
    build_char_tokenizer,
    build_tiny_model,
    build_tiny_models,
    student_config,
    teacher_config,
    tiny_config,
)

__all__ = [
    "TINY_DIR",
    "answer_of",
    "build_char_tokenizer",
    "build_tiny_model",
    "build_tiny_models",
    "exact_match",
    "greedy_accuracy",
    "load_rows",
    "load_student",
    "load_teacher",
    "load_tokenizer",
    "make_rows",
    "pretrain_path",
    "student_config",
    "student_path",
    "teacher_config",
    "teacher_path",
    "test_path",
    "tiny_config",
    "tokenizer_path",
    "train_path",
]

TINY_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "tiny"
MAX_OPERAND = 99  # operands are 0..99, so there are 10,000 distinct problems


def teacher_path() -> str:
    return str(TINY_DIR / "teacher")


def teacher_b_path() -> str:
    """The second, differently shaped teacher (3 layers, 1 KV head, head_dim 16) for
    multi-teacher KV distillation."""
    return str(TINY_DIR / "teacher_b")


def student_hint_path() -> str:
    """The student's shape trained to read a hint ("57;12+45=" -> "57") but barely to add:
    the model shown the answer is a teacher for itself (privileged-context distillation)."""
    return str(TINY_DIR / "student_hint")


def teacher_bpe_path() -> str:
    """The teacher's shape with its own tokenizer (64 BPE tokens: "18", "+1", EOS "</s>"),
    for cross-tokenizer distillation (`protege.xtok`)."""
    return str(TINY_DIR / "teacher_bpe")


def student_h32_path() -> str:
    """The student's recipe with 32-wide heads, which vLLM's CPU attention accepts."""
    return str(TINY_DIR / "student_h32")


def osd_draft_path() -> str:
    """The student's shape trained only on sums of two operands below 50: the draft of
    online speculative distillation (`protege.osd`), shifted from its traffic."""
    return str(TINY_DIR / "osd_draft")


def osd_traffic_path() -> str:
    """2,000 prompts with both operands in 50..99 (three-digit sums): OSD's traffic."""
    return str(TINY_DIR / "osd_traffic.jsonl")


def osd_heldout_path() -> str:
    """200 more prompts of the traffic's domain, never served: OSD's held-out prefixes."""
    return str(TINY_DIR / "osd_heldout.jsonl")


def multi_teacher_path(name: str) -> str:
    """Issue 14's specialists and data: `low` (trained on sums below 100 only), `high` (sums
    of 100 or more only), `train.jsonl` (the training rows, each naming its specialist)."""
    return str(TINY_DIR / "multi_teacher" / name)


def student_path() -> str:
    return str(TINY_DIR / "student")


def tokenizer_path() -> str:
    return str(TINY_DIR / "tokenizer")


def train_path() -> str:
    return str(TINY_DIR / "train.jsonl")


def test_path() -> str:
    return str(TINY_DIR / "test.jsonl")


def pretrain_path() -> str:
    return str(TINY_DIR / "pretrain.txt")


def make_row(a: int, b: int) -> dict[str, str]:
    answer = str(a + b)
    return {"prompt": f"{a}+{b}=", "completion": answer + EOS, "answer": answer}


def make_rows(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[dict[str, str]]:
    """`n` rows with distinct prompts, none of them in `exclude`; deterministic in `seed`."""
    available = (MAX_OPERAND + 1) ** 2 - len(exclude)
    if n > available:
        raise ValueError(f"n={n} exceeds the {available} distinct problems available")
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen = set(exclude)
    while len(rows) < n:
        row = make_row(rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND))
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def load_rows(path: str) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def answer_of(text: str) -> str:
    """The answer in a generated text: everything before the first special token, stripped."""
    for token in SPECIAL_TOKENS:
        text = text.split(token, 1)[0]
    return text.strip()


def exact_match(prediction: str, answer: str) -> bool:
    """True when the prediction's answer equals `answer` exactly ("085" is not "85")."""
    expected = answer_of(answer)
    return bool(expected) and answer_of(prediction) == expected


def load_tokenizer(path: str | None = None):
    return AutoTokenizer.from_pretrained(path or tokenizer_path())


def load_teacher() -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(teacher_path())


def load_student() -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(student_path())


@torch.no_grad()
def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer,
    rows: list[dict[str, str]],
    max_new_tokens: int = 8,
    batch_size: int = 64,
) -> float:
    """Fraction of rows whose greedy, left-padded generation matches `answer` exactly."""
    if not rows:
        return 0.0
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        inputs = tokenizer(
            [row["prompt"] for row in chunk],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        ).to(model.device)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        correct += sum(exact_match(text, row["answer"]) for text, row in zip(texts, chunk))
    model.train(was_training)
    return correct / len(rows)
