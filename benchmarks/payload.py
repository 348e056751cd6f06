"""Teacher payloads: bytes per response token and step time of sampled, top-k + tail, full
logits and hidden states, at three vocabulary sizes.

For each vocabulary a teacher/student pair of that vocabulary scores and trains on one fixed
batch (8 rows, 16 prompt + 32 response tokens):

* V = 30: the built-in tiny pair (trained weights);
* V = 49,152: random weights with SmolLM2-360M's widths (d = 960, 15 heads, 5 KV heads),
  2 layers; student d = 128, 2 layers;
* V = 151,936: random weights with Qwen2.5-0.5B's widths (d = 896, 14 heads, 2 KV heads),
  2 layers; student as above.

Per mode the in-process workers run (median of `--repeats` after a warm-up): the teacher's
scoring (`TeacherScorer.score`), the wire (a pickle round trip of the scored batch, what
Ray's object store copies; a network adds bytes ÷ bandwidth on top), and one learner step
(`Learner.train`: forward, loss, backward, AdamW; for hidden states also the decode with
the frozen teacher head). Losses: `opd` for sampled log-probs, GKD's JSD(β=0.5) for the
others (top-k with the default k = 64), whose value is compared with full logits'.

Step times are fp32 on this machine's CPU (bf16 matmuls on a CPU are ~10× slower than fp32,
so they would time the CPU, not the payload); the bytes of hidden states from a bf16
teacher — the GPU case — are measured by scoring the batch once more with the teacher in bf16
(its states cast to bf16, as a GPU computes them: this CPU computes a bf16 teacher in fp32).

    python benchmarks/payload.py            # the table -> benchmarks/results/payload.{md,json}
    python benchmarks/payload.py --smoke    # small vocabularies, one repeat (the test runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # protege from this checkout

RESULTS = Path(__file__).resolve().parent / "results"
BATCH_ROWS, PROMPT_TOKENS, RESPONSE_TOKENS = 8, 16, 32
TOPK = 64
NETWORK_GBIT = 10  # the bandwidth the "at 10 Gb/s" column divides the bytes by
# (layers, hidden, heads, KV heads, MLP width) of the random-weight teachers, by vocabulary
TEACHER_SHAPES = {49_152: (2, 960, 15, 5, 2560), 151_936: (2, 896, 14, 2, 4864)}
STUDENT_SHAPE = (2, 128, 4, 2, 256)
SMOKE_SHAPES = {4_096: (1, 64, 4, 2, 128)}
MODES = ("sampled", "topk", "full", "hidden")


def model_dir(root: Path, name: str, vocab: int, shape: tuple, seed: int) -> str:
    from protege.tasks.tiny_models import build_tiny_model, tiny_config

    layers, hidden, heads, kv_heads, mlp = shape
    config = tiny_config(layers, hidden, heads, kv_heads, mlp, vocab_size=vocab)
    path = root / f"{name}_{vocab}"
    # No tokenizer: random ids over the whole vocabulary are scored, and a teacher cuts its
    # logits to its tokenizer's ids when its directory has one (a 30-token char tokenizer
    # would make every wider model look padded).
    build_tiny_model(config, seed).save_pretrained(path)
    return str(path)


def pairs(root: Path, smoke: bool) -> dict[int, tuple[str, str]]:
    """vocabulary -> (teacher dir, student dir)."""
    out = {30: ("builtin:tiny/teacher", "builtin:tiny/student")}
    shapes = SMOKE_SHAPES if smoke else TEACHER_SHAPES
    student = SMOKE_SHAPES[4_096] if smoke else STUDENT_SHAPE
    for vocab, shape in shapes.items():
        out[vocab] = (
            model_dir(root, "teacher", vocab, shape, seed=1),
            model_dir(root, "student", vocab, student, seed=2),
        )
    return out


def fixed_batch(vocab: int, student: str):
    """Random prompts and responses (ids >= 4: no special token) with the student's own
    log-probs of them as the behaviour and old log-probs (what `opd` reads)."""
    from protege.algorithms.policy_gradient import token_logprobs
    from protege.modeling import load_model, response_logits
    from protege.records import RolloutBatch

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, vocab, (BATCH_ROWS, PROMPT_TOKENS), generator=g)
    responses = torch.randint(4, vocab, (BATCH_ROWS, RESPONSE_TOKENS), generator=g)
    ones = torch.ones(BATCH_ROWS, PROMPT_TOKENS, dtype=torch.bool)
    batch = RolloutBatch(prompts, ones, responses, torch.ones_like(responses, dtype=torch.bool))
    with torch.no_grad():
        logp = token_logprobs(response_logits(load_model(student), batch).float(), responses)
    return batch.replace(behaviour_logprobs=logp, student_logprobs=logp)


def learner_for(mode: str, teacher: str, student: str, output_dir: str):
    from protege.actors.learner import Learner
    from protege.config import config_from_dict

    algorithm = {"name": "opd"} if mode == "sampled" else {"name": "gkd", "teacher_output": mode}
    tree = {
        "student": {"model": student},
        "teacher": {"model": teacher},
        "learner": {"micro_batch_size": BATCH_ROWS},
        "algorithm": {**algorithm, **({"topk": TOPK} if mode == "topk" else {})},
        "trainer": {"steps": 1000},
        "data": {"train": "builtin:tiny/train"},  # never read: the batches are synthetic
        "output_dir": output_dir,
    }
    config = config_from_dict(tree)
    return Learner(config), config.build_algorithm()


def measure_mode(mode: str, scorer, batch, reference, pair: tuple[str, str], args, scratch) -> dict:
    from protege.actors.teacher import payload_bytes
    from protege.records import RolloutPlan

    plan = RolloutPlan(teacher_need=mode, topk=TOPK)
    learner, algorithm = learner_for(mode, *pair, scratch)
    bare = len(pickle.dumps(batch, protocol=5))
    times: dict[str, list[float]] = {"teacher": [], "wire": [], "learner": [], "wall": []}
    for repeat in range(args.warmup + args.repeats):
        started, wall = time.process_time(), time.perf_counter()
        scored = scorer.score(batch, plan)
        scored_at = time.process_time()
        wire = pickle.dumps(scored, protocol=5)
        received = pickle.loads(wire)
        wired_at = time.process_time()
        learner.train(algorithm.advantages(received))
        if repeat >= args.warmup:
            times["teacher"].append(scored_at - started)
            times["wire"].append(wired_at - scored_at)
            times["learner"].append(time.process_time() - wired_at)
            times["wall"].append(time.perf_counter() - wall)
    tokens = batch.num_response_tokens
    row = {name: 1000 * statistics.median(values) for name, values in times.items()}
    row["step"] = row["teacher"] + row["wire"] + row["learner"]
    row["tensor_bytes_per_token"] = payload_bytes(scored) / tokens
    row["wire_bytes_per_token"] = (len(wire) - bare) / tokens
    row["network_ms"] = 1000 * (len(wire) - bare) * 8 / (NETWORK_GBIT * 1e9)
    if mode != "sampled":  # the loss of one fixed student: the untrained one
        row["jsd"] = reference_jsd(reference, algorithm, received, learner)
    return row


def reference_jsd(reference: torch.Tensor, algorithm, batch, learner) -> float:
    """GKD's JSD(β=0.5) of the student logits `reference` [B,T,V] against what `batch`
    carries (hidden states decoded by the learner's teacher head, as in training)."""
    from protege.student import StudentLogits

    if batch.teacher_hidden is not None:
        batch = learner.teacher_head.decode(batch)
    return float(algorithm.loss(StudentLogits(reference), batch)[0])


def measure_vocabulary(vocab: int, teacher: str, student: str, args, scratch: str) -> dict:
    from protege.actors.teacher import TeacherScorer, payload_bytes
    from protege.modeling import load_model, response_logits
    from protege.records import RolloutPlan

    batch = fixed_batch(vocab, student)
    with torch.no_grad():
        reference = response_logits(load_model(student), batch).float()
    scorer = TeacherScorer(teacher, micro_batch_size=BATCH_ROWS)
    rows = {
        mode: measure_mode(mode, scorer, batch, reference, (teacher, student), args, scratch)
        for mode in MODES
    }
    full_jsd = rows["full"]["jsd"]
    for row in rows.values():
        if "jsd" in row:
            row["jsd_relative_error"] = abs(row["jsd"] - full_jsd) / full_jsd
    bf16 = TeacherScorer(teacher, dtype="bfloat16", micro_batch_size=BATCH_ROWS)
    hidden_bf16 = bf16.score(batch, RolloutPlan(teacher_need="hidden"))
    # a CPU without bfloat16 arithmetic computes (and ships) float32 states (protege.cpu_bf16);
    # a GPU's bf16 teacher ships them in bf16
    hidden_bf16 = hidden_bf16.replace(teacher_hidden=hidden_bf16.teacher_hidden.to(torch.bfloat16))
    config = scorer.model.config
    return {
        "vocab": vocab,
        "teacher_hidden_size": config.hidden_size,
        "teacher_layers": config.num_hidden_layers,
        "modes": rows,
        "hidden_bf16_tensor_bytes_per_token": payload_bytes(hidden_bf16)
        / batch.num_response_tokens,
    }


def markdown(results: dict) -> str:
    setup = results["setup"]
    lines = [
        "# Teacher payloads: bytes per response token and step time",
        "",
        (
            f"One batch of {setup['rows']} rows × ({setup['prompt_tokens']} prompt + "
            f"{setup['response_tokens']} response tokens), in-process workers, fp32, "
            f"{setup['threads']} torch thread; median of {setup['repeats']} repeats after "
            f"{setup['warmup']} warm-up; {setup['cpus']} CPU cores shared with other jobs (load "
            f"average {setup['load_average']}). top-k: k = {TOPK} + tail. Times are CPU ms of "
            "this single-threaded process (the work, which the machine's other load changes "
            "little; the wall time of the whole step is the last time column). Step = teacher "
            f"+ wire (pickle round trip) + learner; 'at {NETWORK_GBIT} Gb/s' is the pickled bytes "
            "÷ that bandwidth (not measured: what a network between teacher and learner adds). "
            "The JSD error of top-k is that of random-weight teachers, whose distributions are "
            "nearly flat (a worst case for top-k); hidden states are exact by construction."
        ),
        "",
        (
            "| V | teacher d | mode | tensor B/token | pickled B/token | full ÷ this | teacher ms "
            f"| wire ms | learner ms | step ms | step wall ms | at {NETWORK_GBIT} Gb/s ms "
            "| JSD rel. error vs full |"
        ),
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for entry in results["vocabularies"]:
        full = entry["modes"]["full"]["wire_bytes_per_token"]
        for mode, row in entry["modes"].items():
            name = f"top-{TOPK} + tail" if mode == "topk" else mode
            error = f"{row['jsd_relative_error']:.2e}" if "jsd_relative_error" in row else "–"
            ratio = full / row["wire_bytes_per_token"]
            lines.append(
                f"| {entry['vocab']:,} | {entry['teacher_hidden_size']} | {name} | "
                f"{row['tensor_bytes_per_token']:,.0f} | {row['wire_bytes_per_token']:,.0f} | "
                f"{ratio:,.1f}× | {row['teacher']:.0f} | {row['wire']:.1f} | "
                f"{row['learner']:.0f} | {row['step']:.0f} | {row['wall']:.0f} | "
                f"{row['network_ms']:.2f} | {error} |"
            )
    lines += ["", "Hidden states from a bf16 teacher (the GPU case), tensor bytes per token:", ""]
    for entry in results["vocabularies"]:
        full = entry["modes"]["full"]["tensor_bytes_per_token"]
        bf16 = entry["hidden_bf16_tensor_bytes_per_token"]
        lines.append(
            f"* V = {entry['vocab']:,} (d = {entry['teacher_hidden_size']}): {bf16:,.0f} B "
            f"(full fp32 logits ÷ this: {full / bf16:,.1f}×)"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="V = 30 and 4,096; one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.warmup = 1, 0
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        vocabularies = [
            measure_vocabulary(vocab, teacher, student, args, str(root / f"run_{vocab}"))
            for vocab, (teacher, student) in pairs(root, args.smoke).items()
        ]
    results = {
        "setup": {
            "rows": BATCH_ROWS,
            "prompt_tokens": PROMPT_TOKENS,
            "response_tokens": RESPONSE_TOKENS,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
            "machine": platform.machine(),
            "torch": torch.__version__,
            "smoke": args.smoke,
        },
        "vocabularies": vocabularies,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "payload.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.results / "payload.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
