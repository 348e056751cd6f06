"""`protege check PRESET [a.b=value ...]`: will this run work, before it costs hours?

The start-up checks every run makes (config, paths, tokenizers and chat templates, positions)
and then, in this process (`trainer.workers=local`), one real rollout and one dry step:

* the teacher scores the same batch twice and gives the same numbers;
* the sampler's log-probs of its own tokens equal the learner's recompute on the same weights
  (a train/inference mismatch biases every on-policy gradient);
* with the student as its own teacher the algorithm's loss is ~0 (misaligned positions or
  vocabularies show up here);
* one full training step: its seconds and every role's peak memory, as an estimate.

Each failure names the fix; the exit code is 2 when one fails, 0 otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
import time
from collections.abc import Callable

from protege.config import Config, load_config
from protege.errors import ProtegeError, report
from protege.records import RolloutBatch

TEACHER_REPEAT_TOL = 1e-4  # nats: the same forward on the same batch twice
MISMATCH_TOL = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 1e-2}  # max nats per token
SELF_LOSS_TOL = 1e-3  # the loss with teacher == student


@dataclasses.dataclass(frozen=True)
class Finding:
    name: str
    ok: bool
    detail: str


def check_config(config: Config) -> Config:
    """The run's config made local, one step, no evaluation or logging, in a scratch folder."""
    scratch = tempfile.mkdtemp(prefix="protege-check-")
    trainer = config.trainer.model_copy(
        update={
            "workers": "local",
            "steps": 1,
            "save_every": 0,
            "resume": False,
            "max_staleness": 0,
        }
    )
    logging = config.logging.model_copy(update={"wandb": "disabled", "progress": False})
    data = config.data.model_copy(update={"test": None})
    return config.model_copy(
        update={"trainer": trainer, "logging": logging, "data": data, "output_dir": scratch}
    )


def run_checks(config: Config, say: Callable[[str], None] = print) -> list[Finding]:
    from protege.run import build_controller

    say("[check] start-up checks (config, paths, tokenizers, chat templates, positions) ...")
    controller = build_controller(check_config(config))
    say("[check] start-up checks passed; one rollout and one dry step in this process ...")
    pipeline, algo = controller.pipeline, controller.algo
    prompts = controller.prompts.next(0)
    plan = algo.plan(0)
    batch = pipeline.gather(controller.rollout(0, prompts), prompts)
    rank = pipeline.learners[0]

    def learner(method: str, *args):  # an actor call, in this process
        return pipeline.launcher.get(getattr(rank, method).remote(*args))

    findings = [
        teacher_repeat(pipeline, batch, plan),
        train_inference_match(learner, batch, config.student.dtype),
        self_distillation(learner, algo, batch, plan),
    ]
    findings.append(dry_step(controller))
    return findings


def teacher_repeat(pipeline, batch: RolloutBatch, plan) -> Finding:
    if plan.teacher_need in ("none", "kv"):
        return Finding("teacher determinism", True, f"skipped (teacher_need={plan.teacher_need})")
    teacher = pipeline.teachers[0]
    named = batch.named_teachers.get(teacher.name)  # several teachers: each under its name
    first = batch.teacher_logprobs if named is None else named.logprobs
    unscored = batch.replace(named_teachers={})
    again = pipeline.launcher.get(teacher.score([unscored], plan))[0]
    mask = batch.response_mask
    diff = float((again.teacher_logprobs - first)[mask].abs().max())
    ok = diff <= TEACHER_REPEAT_TOL
    fix = (
        ""
        if ok
        else "; a non-deterministic teacher (dropout left on? a sampling backend?) gives noisy targets"
    )
    return Finding(
        "teacher determinism", ok, f"max |Δ log p_T| over two scorings = {diff:.2e}{fix}"
    )


def train_inference_match(learner, batch: RolloutBatch, dtype: str) -> Finding:
    recomputed = learner("recompute_logprobs", batch)
    mask = batch.response_mask & (batch.token_source == 0)  # tokens the student drew
    if not bool(mask.any()):
        return Finding("sampler vs learner log-probs", True, "skipped (no student-drawn tokens)")
    gap = (batch.student_logprobs - recomputed)[mask].abs()
    ok = float(gap.max()) <= MISMATCH_TOL[dtype]
    fix = (
        ""
        if ok
        else "; the sampler and learner disagree on the same weights: use the same dtype for "
        "student and rollout (student.dtype, learner.precision) or check the rollout backend"
    )
    return Finding(
        "sampler vs learner log-probs",
        ok,
        f"max |Δ| = {float(gap.max()):.2e}, mean {float(gap.mean()):.2e} nats/token "
        f"(tolerance {MISMATCH_TOL[dtype]:g} at student.dtype={dtype}){fix}",
    )


def self_distillation(learner, algo, batch: RolloutBatch, plan) -> Finding:
    if plan.teacher_need in ("none", "kv") or batch.rewards is not None:
        why = "rewards enter the loss" if batch.rewards is not None else plan.teacher_need
        return Finding("self-distillation loss", True, f"skipped ({why})")
    if plan.cross_tokenizer != "none":  # the learner scores its student on the student's ids
        why = f"cross_tokenizer={plan.cross_tokenizer}: spans come from the teacher's tokenizer"
        return Finding("self-distillation loss", True, f"skipped ({why})")
    # Without MiniLLM's pre-training rows: their LM loss does not vanish at teacher = student.
    # Several teachers' named outputs dropped: the student alone is the teacher here.
    alone = batch.replace(pretrain_ids=None, pretrain_mask=None, named_teachers={})
    own = learner("self_scored", alone, plan)
    own = algo.advantages(own)
    loss = learner("loss_value", own, algo.loss_for(0))
    ok = abs(loss) <= SELF_LOSS_TOL
    fix = (
        ""
        if ok
        else "; with the student as its own teacher the loss should vanish: the teacher's "
        "outputs are misaligned with the student's tokens (vocabulary, positions, template)"
    )
    return Finding("self-distillation loss", ok, f"loss with teacher = student: {loss:.2e}{fix}")


def dry_step(controller) -> Finding:
    controller.pipeline.take_seconds()  # the checks' own worker seconds are not the step's
    started = time.perf_counter()
    metrics = controller.step(0)
    seconds = time.perf_counter() - started
    memory = {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("memory/")}
    peaks = ", ".join(f"{k.removesuffix('_peak_gib')} {v:.2f} GiB" for k, v in memory.items())
    phases = {k: v for k, v in controller.pipeline.take_seconds().items() if k.startswith("time/")}
    parts = ", ".join(f"{k[5:]} {v:.2f}" for k, v in phases.items() if v >= 0.005)
    ok = math.isfinite(metrics.get("learner/loss", 0.0))
    return Finding(
        "one training step",
        ok,
        f"{seconds:.2f} s ({parts}); peak memory {peaks}"
        + ("" if ok else "; the loss is not finite: lower learner.lr, check the data"),
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        findings = run_checks(load_config(argv[0], argv[1:]))
    except ProtegeError as error:
        return report(error)
    for finding in findings:
        print(f"{'ok  ' if finding.ok else 'FAIL'} {finding.name}: {finding.detail}")
    return 0 if all(f.ok for f in findings) else 2
