"""Regenerate `protege/assets/tiny/`: data files, tokenizer, trained teacher and weak student.

    python scripts/build_tiny_assets.py            # 3-5 min on 2 CPU cores
    python scripts/build_tiny_assets.py --skip-headroom-check   # 2-3 min
    python scripts/build_tiny_assets.py --only teacher_b   # the second KV teacher, ~2 min
    python scripts/build_tiny_assets.py --only student_h32  # vLLM-on-CPU student, seconds
    python scripts/build_tiny_assets.py --only osd_draft  # OSD's shifted draft + traffic, ~1 min
    python scripts/build_tiny_assets.py --only student_hint  # privileged-context student, ~1 min
    python scripts/build_tiny_assets.py --only multi_teacher  # two specialist teachers, ~3 min
    python scripts/build_tiny_assets.py --only teacher_bpe --threads 1  # BPE teacher, ~5 min

Deterministic (seeded). Steps and measured times on 2 CPU cores:
* teacher (4 x 128): 3,000 steps of batch 64 at lr 2e-3 on fresh gold problems (never a
  test prompt) — 2-3 min, ~100% greedy exact match;
* student (2 x 64): 300 steps of batch 64 at lr 5e-3 on the 300 labelled rows only
  (the first 300 of train.jsonl) — a few seconds, ~10%;
* headroom check (not shipped): the same 2 x 64 student trained like the teacher — ~1 min,
  proves the student shape can reach ~100% so distillation has room to work.
* teacher_b (3 x 96, 6 query heads, 1 key/value head, head_dim 16): a second, differently
  shaped teacher for multi-teacher KV distillation (`protege.kv`); 2,000 steps of batch 64
  at lr 2e-3 on fresh gold problems. Built after the others from its own seeds, so the
  shipped teacher/student are unchanged; its numbers go to `teacher_b/build.json`.
* student_h32 (2 x 64, 2 heads of 32, 2 KV heads): the student's recipe with 32-wide heads,
  the narrowest vLLM's CPU attention accepts, so `rollout.backend=vllm` runs on CPU; its
  numbers go to `student_h32/build.json`.
* osd_draft (the student's shape) for online speculative distillation (`protege.osd`): 1,500
  steps of batch 64 at lr 2e-3 on gold problems whose operands are both below 50 (domain
  "low"), plus `osd_traffic.jsonl` (2,000 prompts) and `osd_heldout.jsonl` (200 others) with
  both operands 50..99 (domain "high": three-digit sums it never saw); its numbers, in and
  out of its domain, go to `osd_draft/build.json`.
* student_hint for privileged-context self-distillation: the shipped student trained on,
  each step, half the 300 labelled rows (as the student saw them) and half fresh gold
  problems shown with their answer first (`HINT`, e.g. "57;12+45=" -> "57"): it learns to
  read a hint, not to add, so it stays weak on plain prompts and is strong on hinted ones;
  its numbers (plain and hinted accuracy) go to `student_hint/build.json`.
* multi_teacher/ (issue 14): two specialists of student_h32's shape, `low` trained only on
  problems whose sum is below 100 and `high` only on sums of 100 or more (1,200 and 2,400
  steps of batch 64 at lr 3e-3), plus `train.jsonl`: the shipped training rows, each with a
  `teacher` field naming the specialist of its half (per-sample routing). Their accuracy on
  the mixed test set and on each half goes to `multi_teacher/<half>/build.json`.
* teacher_bpe (the teacher's 4 x 128 shape as a Llama model, ~0.8 M parameters, a 64-token
  BPE vocabulary trained on the task's prompts and answers, so "18" and "+1" are single
  tokens, EOS "</s>"): the teacher of cross-tokenizer distillation (`protege.xtok`); 3,000
  steps of batch 64 at lr 2e-3 on fresh gold problems, prompt and completion tokenised apart
  (as the cross-tokenizer scorer reads them), saved in bfloat16 (1.6 MB); its numbers go to
  `teacher_bpe/build.json`. (With --threads 2 on a loaded machine its two OpenMP threads
  thrashed: 11 steps a minute.)
Results are written to `protege/assets/tiny/manifest.json`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from protege.tasks.tiny import (
    TINY_DIR,
    build_char_tokenizer,
    build_tiny_model,
    greedy_accuracy,
    load_rows,
    make_row,
    make_rows,
    student_config,
    teacher_config,
    tiny_config,
    train_path,
)

TEST_SEED, TRAIN_SEED, PRETRAIN_SEED = 1, 2, 3
NUM_TEST, NUM_TRAIN, NUM_LABELLED, NUM_PRETRAIN = 200, 2000, 300, 2000
# (layers, hidden, attention heads, key/value heads, MLP width) of the second KV teacher:
# other layer count, KV-head count (MQA) and head dim than the shipped teacher.
TEACHER_B_SHAPE = (3, 96, 6, 1, 288)
TEACHER_B_STEPS, TEACHER_B_SEEDS = 2000, (41, 42)
STUDENT_H32_SHAPE = (2, 64, 2, 2, 128)
OSD_LOW, OSD_HIGH = (0, 49), (50, 99)  # operand ranges of the draft's domain and the traffic's
OSD_DRAFT_STEPS, OSD_DRAFT_SEEDS, OSD_TRAFFIC_SEED = 1500, (51, 52), 53
NUM_OSD_TRAFFIC, NUM_OSD_HELDOUT = 2000, 200
STUDENT_HINT_STEPS, STUDENT_HINT_SEEDS = 300, (62, 63)
HINT = "{answer};{prompt}"  # the hinted prompt student_hint learns to read
# three-digit sums take the same shape longer: at 1,200 steps `high` was still at 16% on its half
MULTI_STEPS, MULTI_LR = {"low": 1200, "high": 2400}, 3e-3
MULTI_SEEDS = {"low": (61, 62), "high": (63, 64)}
MULTI_SPLIT = 100  # teacher "low" knows sums below it, "high" the others
TEACHER_BPE_SHAPE, TEACHER_BPE_STEPS, TEACHER_BPE_SEEDS = (4, 128, 4, 2, 384), 3000, (61, 62, 63)
BATCH_SIZE = 64

Rows = list[dict[str, str]]


def write_data(test_rows: Rows, train_rows: Rows, pretrain_rows: Rows) -> None:
    for name, rows in (("test.jsonl", test_rows), ("train.jsonl", train_rows)):
        with open(TINY_DIR / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(TINY_DIR / "pretrain.txt", "w", encoding="utf-8") as f:
        f.writelines(row["prompt"] + row["answer"] + "\n" for row in pretrain_rows)


def sft_batch(tokenizer, rows: Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B,T], attention mask [B,T], and a loss mask [B,T] over completions."""
    prompt_lengths = [
        len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows
    ]
    encoded = tokenizer(
        [r["prompt"] + r["completion"] for r in rows],
        return_tensors="pt",
        padding=True,
        padding_side="right",
        add_special_tokens=False,
    )
    positions = torch.arange(encoded["input_ids"].shape[1])[None]
    loss_mask = (positions >= torch.tensor(prompt_lengths)[:, None]) & encoded[
        "attention_mask"
    ].bool()
    return encoded["input_ids"], encoded["attention_mask"], loss_mask


def train(
    model,
    tokenizer,
    next_rows: Callable[[int], Rows],
    steps: int,
    lr: float,
    name: str,
    make_batch: Callable = sft_batch,
) -> float:
    """Completion-only cross-entropy with AdamW, 50 warm-up steps and linear decay.
    Returns the wall time in seconds."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / steps)
    )
    model.train()
    start = time.time()
    for step in range(steps):
        input_ids, attention_mask, loss_mask = make_batch(tokenizer, next_rows(step))
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        token_loss = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
        target_mask = loss_mask[:, 1:].float()
        loss = (token_loss * target_mask).sum() / target_mask.sum().clamp(min=1)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % 500 == 0 or step + 1 == steps:
            print(f"{name} step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    model.eval()
    return time.time() - start


def gold_stream(exclude: frozenset[str], seed: int) -> Callable[[int], Rows]:
    """Fresh gold problems every step, never a test prompt."""
    return lambda step: make_rows(BATCH_SIZE, seed * 1_000_003 + step, exclude=exclude)


def labelled_stream(rows: Rows, seed: int) -> Callable[[int], Rows]:
    rng = random.Random(seed)
    return lambda step: rng.sample(rows, min(BATCH_SIZE, len(rows)))


def save(model, tokenizer, name: str) -> None:
    out = TINY_DIR / name
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_teacher_b(tokenizer, test_rows: Rows) -> None:
    """The second KV-distillation teacher (see the module docstring); writes teacher_b/."""
    test_prompts = frozenset(r["prompt"] for r in test_rows)
    model = build_tiny_model(tiny_config(*TEACHER_B_SHAPE), TEACHER_B_SEEDS[0])
    stream = gold_stream(test_prompts, TEACHER_B_SEEDS[1])
    build_extra(model, tokenizer, stream, TEACHER_B_STEPS, 2e-3, "teacher_b", test_rows)


def build_student_h32(tokenizer, test_rows: Rows, labelled: Rows) -> None:
    """The student's recipe with 32-wide heads (vLLM on CPU); writes student_h32/."""
    model = build_tiny_model(tiny_config(*STUDENT_H32_SHAPE), 11)
    build_extra(
        model, tokenizer, labelled_stream(labelled, 12), 300, 5e-3, "student_h32", test_rows
    )


def domain_rows(n: int, seed: int, operands: tuple[int, int], exclude=frozenset()) -> Rows:
    """`n` distinct problems whose two operands both lie in `operands` (inclusive)."""
    rng = random.Random(seed)
    rows: Rows = []
    seen = set(exclude)
    while len(rows) < n:
        row = make_row(rng.randint(*operands), rng.randint(*operands))
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def build_osd_draft(tokenizer) -> None:
    """The domain-shifted draft and its traffic (see the module docstring)."""
    traffic = domain_rows(NUM_OSD_TRAFFIC + NUM_OSD_HELDOUT, OSD_TRAFFIC_SEED, OSD_HIGH)
    for name, rows in (
        ("osd_traffic.jsonl", traffic[:NUM_OSD_TRAFFIC]),
        ("osd_heldout.jsonl", traffic[NUM_OSD_TRAFFIC:]),
    ):
        with open(TINY_DIR / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    low_test = domain_rows(NUM_TEST, TEST_SEED, OSD_LOW)
    stream_seed = OSD_DRAFT_SEEDS[1]
    model = build_tiny_model(student_config(), OSD_DRAFT_SEEDS[0])
    stream = lambda step: domain_rows(BATCH_SIZE, stream_seed * 1_000_003 + step, OSD_LOW)
    extra = {"high_domain_accuracy": traffic[NUM_OSD_TRAFFIC:]}
    build_extra(model, tokenizer, stream, OSD_DRAFT_STEPS, 2e-3, "osd_draft", low_test, extra)


def hinted(rows: Rows) -> Rows:
    """`rows` with each prompt shown with its answer first (the privileged view)."""
    return [{**row, "prompt": HINT.format(**row)} for row in rows]


def build_student_hint(tokenizer, test_rows: Rows, labelled: Rows) -> None:
    """The student that reads hints (see the module docstring); writes student_hint/."""
    from protege.tasks.tiny import load_student

    test_prompts = frozenset(r["prompt"] for r in test_rows)
    labelled_seed, gold_seed = STUDENT_HINT_SEEDS
    plain = labelled_stream(labelled, labelled_seed)
    half = BATCH_SIZE // 2

    def stream(step: int) -> Rows:
        gold = make_rows(half, gold_seed * 1_000_003 + step, exclude=test_prompts)
        return plain(step)[:half] + hinted(gold)

    model = load_student()  # the shipped student, so it starts from the student's skill
    extra = {"hinted_accuracy": hinted(test_rows)}
    steps, lr = STUDENT_HINT_STEPS, 2e-3
    build_extra(model, tokenizer, stream, steps, lr, "student_hint", test_rows, extra)


def sum_half(row: dict[str, str]) -> str:
    """The specialist that knows `row`: "low" for sums below MULTI_SPLIT, else "high"."""
    return "low" if int(row["answer"]) < MULTI_SPLIT else "high"


def half_stream(exclude: frozenset[str], seed: int, half: str) -> Callable[[int], Rows]:
    """Fresh gold problems of one half only (four batches drawn, the other half dropped)."""

    def rows(step: int) -> Rows:
        drawn = make_rows(4 * BATCH_SIZE, seed * 1_000_003 + step, exclude=exclude)
        return [row for row in drawn if sum_half(row) == half][:BATCH_SIZE]

    return rows


def build_multi_teacher(tokenizer, test_rows: Rows, halves=tuple(MULTI_SEEDS)) -> None:
    """Two specialist teachers and a routed training file (see the module docstring)."""
    out = TINY_DIR / "multi_teacher"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps({**row, "teacher": sum_half(row)}) + "\n" for row in load_rows(train_path())
        )
    test_prompts = frozenset(r["prompt"] for r in test_rows)
    by_half = {
        f"{h}_half_accuracy": [r for r in test_rows if sum_half(r) == h] for h in MULTI_SEEDS
    }
    for half in halves:
        model_seed, stream_seed = MULTI_SEEDS[half]
        model = build_tiny_model(tiny_config(*STUDENT_H32_SHAPE), model_seed)
        stream = half_stream(test_prompts, stream_seed, half)
        name = f"multi_teacher/{half}"
        steps = MULTI_STEPS[half]
        build_extra(model, tokenizer, stream, steps, MULTI_LR, name, test_rows, by_half)


def bpe_batch(tokenizer, rows: Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sft_batch` for a tokenizer whose merges cross the prompt/answer boundary: prompt and
    answer + EOS are tokenised apart and concatenated, as the cross-tokenizer scorer does."""
    pieces = [
        (
            tokenizer(r["prompt"], add_special_tokens=False)["input_ids"],
            tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id],
        )
        for r in rows
    ]
    width = max(len(p) + len(c) for p, c in pieces)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, (prompt, completion) in enumerate(pieces):
        n = len(prompt) + len(completion)
        input_ids[b, :n] = torch.tensor(prompt + completion)
        attention_mask[b, :n] = 1
        loss_mask[b, len(prompt) : n] = True
    return input_ids, attention_mask, loss_mask


def build_teacher_bpe(test_rows: Rows) -> None:
    """The cross-tokenizer teacher (see the module docstring); writes teacher_bpe/."""
    from protege.tasks.tiny_bpe import build_bpe_teacher, train_bpe_tokenizer

    test_prompts = frozenset(r["prompt"] for r in test_rows)
    corpus = make_rows(5000, TEACHER_BPE_SEEDS[2], exclude=test_prompts)
    tokenizer = train_bpe_tokenizer(t for r in corpus for t in (r["prompt"], r["answer"]))
    model = build_bpe_teacher(tokenizer, TEACHER_BPE_SEEDS[0], TEACHER_BPE_SHAPE)
    stream = gold_stream(test_prompts, TEACHER_BPE_SEEDS[1])
    seconds = train(model, tokenizer, stream, TEACHER_BPE_STEPS, 2e-3, "teacher_bpe", bpe_batch)
    save(model.to(torch.bfloat16), tokenizer, "teacher_bpe")
    reloaded = AutoModelForCausalLM.from_pretrained(TINY_DIR / "teacher_bpe", dtype=torch.float32)
    accuracy = greedy_accuracy(reloaded, tokenizer, test_rows)
    print(f"teacher_bpe: test accuracy {accuracy:.3f} after {seconds:.0f} s", flush=True)
    summary = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "steps": TEACHER_BPE_STEPS,
        "lr": 2e-3,
        "train_seconds": round(seconds, 1),
        "test_accuracy": accuracy,
    }
    with open(TINY_DIR / "teacher_bpe" / "build.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)


def build_extra(
    model,
    tokenizer,
    stream,
    steps: int,
    lr: float,
    name: str,
    test_rows: Rows,
    extra_sets: dict[str, Rows] | None = None,
) -> None:
    """Train and save an asset outside the manifest; its numbers go to `<name>/build.json`
    (greedy accuracy on `test_rows`, and on each of `extra_sets`)."""
    seconds = train(model, tokenizer, stream, steps, lr, name)
    accuracy = greedy_accuracy(model, tokenizer, test_rows)
    print(f"{name}: test accuracy {accuracy:.3f} after {seconds:.0f} s", flush=True)
    save(model, tokenizer, name)
    summary = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "lr": lr,
        "train_seconds": round(seconds, 1),
        "test_accuracy": accuracy,
    }
    for key, rows in (extra_sets or {}).items():
        summary[key] = greedy_accuracy(model, tokenizer, rows)
        print(f"{name}: {key} {summary[key]:.3f}", flush=True)
    with open(TINY_DIR / name / "build.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-headroom-check", action="store_true")
    parser.add_argument(
        "--only",
        choices=[
            "teacher_b",
            "student_h32",
            "osd_draft",
            "student_hint",
            "multi_teacher",
            "teacher_bpe",
        ],
        default=None,
        help="build only this asset from the shipped test set",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only == "teacher_b":
        build_teacher_b(build_char_tokenizer(), make_rows(NUM_TEST, TEST_SEED))
        return
    if args.only == "multi_teacher":
        build_multi_teacher(build_char_tokenizer(), make_rows(NUM_TEST, TEST_SEED))
    if args.only == "teacher_bpe":
        build_teacher_bpe(make_rows(NUM_TEST, TEST_SEED))
        return
    if args.only == "osd_draft":
        build_osd_draft(build_char_tokenizer())
        return
    if args.only == "student_h32":
        labelled = load_rows(train_path())[:NUM_LABELLED]
        build_student_h32(build_char_tokenizer(), make_rows(NUM_TEST, TEST_SEED), labelled)
        return
    if args.only == "student_hint":
        labelled = load_rows(train_path())[:NUM_LABELLED]
        build_student_hint(build_char_tokenizer(), make_rows(NUM_TEST, TEST_SEED), labelled)
        return
    TINY_DIR.mkdir(parents=True, exist_ok=True)

    test_rows = make_rows(NUM_TEST, TEST_SEED)
    test_prompts = frozenset(r["prompt"] for r in test_rows)
    train_rows = make_rows(NUM_TRAIN, TRAIN_SEED, exclude=test_prompts)
    write_data(test_rows, train_rows, make_rows(NUM_PRETRAIN, PRETRAIN_SEED, exclude=test_prompts))

    tokenizer = build_char_tokenizer()
    shutil.rmtree(TINY_DIR / "tokenizer", ignore_errors=True)
    tokenizer.save_pretrained(TINY_DIR / "tokenizer")
    manifest: dict[str, dict[str, float]] = {}

    def run(name: str, config, seed: int, stream, steps: int, lr: float):
        model = build_tiny_model(config, seed)
        seconds = train(model, tokenizer, stream, steps, lr, name)
        accuracy = greedy_accuracy(model, tokenizer, test_rows)
        manifest[name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "steps": steps,
            "lr": lr,
            "train_seconds": round(seconds, 1),
            "test_accuracy": accuracy,
        }
        print(f"{name}: test accuracy {accuracy:.3f} after {seconds:.0f} s", flush=True)
        return model

    student = run(
        "student", student_config(), 11, labelled_stream(train_rows[:NUM_LABELLED], 12), 300, 5e-3
    )
    save(student, tokenizer, "student")
    teacher = run("teacher", teacher_config(), 21, gold_stream(test_prompts, 22), 3000, 2e-3)
    save(teacher, tokenizer, "teacher")
    if not args.skip_headroom_check:
        run("student_on_gold", student_config(), 31, gold_stream(test_prompts, 32), 3000, 2e-3)
    with open(TINY_DIR / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    build_teacher_b(tokenizer, test_rows)
    build_student_h32(tokenizer, test_rows, train_rows[:NUM_LABELLED])
    build_osd_draft(tokenizer)
    build_student_hint(tokenizer, test_rows, train_rows[:NUM_LABELLED])
    build_multi_teacher(tokenizer, test_rows)
    build_teacher_bpe(test_rows)


if __name__ == "__main__":
    main()
