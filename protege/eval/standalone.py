"""Evaluate any saved HF causal-LM directory on a JSONL test set, outside a training run.

    python -m protege.eval MODEL_DIR --data test.jsonl [--teacher DIR] [--samples K] [--json out.json]

MODEL_DIR is an HF model directory (e.g. a run's `output_dir/final`) or `builtin:tiny/...`;
the data rows need `prompt` and `answer`. The same `Evaluator` as during training runs
over `LocalModels`, an in-process stand-in for the Pipeline.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
from pathlib import Path

from protege.errors import ProtegeError, report
from protege.records import PromptBatch, RolloutBatch, RolloutPlan


class InputError(ProtegeError):
    """Bad command-line input; printed as one block, without a traceback."""


class LocalModels:
    """The Pipeline's evaluation interface over one in-process sampler (and teacher)."""

    def __init__(
        self,
        model: str,
        teacher: str | None = None,
        max_new_tokens: int = 8,
        temperature: float = 1.0,
        seed: int = 0,
    ):
        from protege.actors.sampler import HFSampler
        from protege.actors.teacher import TeacherScorer
        from protege.config import RolloutConfig

        rollout = RolloutConfig(max_new_tokens=max_new_tokens, temperature=temperature)
        self.sampler = HFSampler(model, rollout, teacher_model=teacher, seed=seed)
        self.teacher = TeacherScorer(teacher) if teacher else None
        self.seconds: dict[str, float] = {}

    def greedy_texts(self, prompts: PromptBatch, max_new_tokens: int) -> list[str]:
        return self.sampler.greedy_texts(prompts, max_new_tokens)

    def sample(self, prompts: PromptBatch, plan: RolloutPlan) -> RolloutBatch:
        return self.sampler.generate(prompts, plan)

    def score(self, batch: RolloutBatch, plan: RolloutPlan) -> RolloutBatch:
        if self.teacher is None:
            raise InputError("teacher agreement needs --teacher")
        return self.teacher.score(batch, plan)


def load_checker(spec: str):
    """`exact` (stripped string equality), `tiny` (the tiny task's: text before the first
    special token) or `module:function` taking (prediction, answer) -> bool."""
    if spec == "exact":
        from protege.evaluation import exact_match

        return exact_match
    if spec == "tiny":
        from protege.tasks.tiny import exact_match

        return exact_match
    module, _, function = spec.partition(":")
    if not function:
        raise InputError(f"--checker: {spec!r} is not 'exact', 'tiny' or 'module:function'")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as error:
        raise InputError(f"--checker: cannot load {spec!r} ({error})") from None


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    from protege.data import DataError, read_jsonl
    from protege.evaluation import Evaluator
    from protege.modeling import check_model_dir, check_same_vocabulary, load_tokenizer

    model = check_model_dir(args.model, "MODEL_DIR")
    teacher = check_model_dir(args.teacher, "--teacher") if args.teacher else None
    if args.samples < 0 or args.max_new_tokens < 1 or args.temperature <= 0:
        raise InputError("--samples must be >= 0, --max-new-tokens >= 1 and --temperature > 0")
    try:
        rows = read_jsonl(args.data)
    except DataError as error:
        raise InputError(f"--data: {error}") from None
    rows = rows[: args.limit] if args.limit else rows
    unanswered = [i for i, row in enumerate(rows, start=1) if row.answer is None]
    if unanswered:
        raise InputError(
            f"--data: {len(unanswered)} of {len(rows)} rows have no 'answer' (first: row {unanswered[0]}); "
            "accuracy needs an answer per row"
        )
    checker = load_checker(args.checker)
    try:
        tokenizer = load_tokenizer(model)
        if teacher:
            check_same_vocabulary(tokenizer, load_tokenizer(teacher))
        workers = LocalModels(model, teacher, args.max_new_tokens, args.temperature, args.seed)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load the model: {error}") from None
    evaluator = Evaluator(
        rows,
        tokenizer,
        args.max_new_tokens,
        checker=checker,
        chat_template=args.chat_template,
        samples=args.samples,
        teacher_kl=teacher is not None and args.samples > 0,
    )
    return evaluator.run(workers)


def format_metrics(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join(f"{key:<{width}}  {value:.4f}" for key, value in metrics.items())


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        metrics = evaluate(args)
    except ProtegeError as error:
        return report(error)
    print(f"{args.model} on {args.data}" + (f" (teacher {args.teacher})" if args.teacher else ""))
    print(format_metrics(metrics))
    if args.json:
        clean = {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()
        }
        payload = {
            "model": args.model,
            "data": args.data,
            "teacher": args.teacher,
            "samples": args.samples,
            "metrics": clean,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m protege.eval", description="Evaluate a saved model on a JSONL test set."
    )
    p.add_argument(
        "model", metavar="MODEL_DIR", help="saved HF model directory (or builtin:tiny/student)"
    )
    p.add_argument(
        "--data",
        required=True,
        help="JSONL with 'prompt' and 'answer' per row (or builtin:tiny/test)",
    )
    p.add_argument(
        "--teacher", help="teacher model directory: adds reverse/forward KL to it (needs --samples)"
    )
    p.add_argument(
        "--samples",
        type=int,
        default=0,
        help="samples per prompt for pass@k, entropy, self-BLEU, ECE",
    )
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature (KL estimates assume 1)",
    )
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N rows")
    p.add_argument(
        "--checker", default="exact", help="exact | tiny | module:function (default exact)"
    )
    p.add_argument(
        "--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the metrics to this JSON file")
    return p
