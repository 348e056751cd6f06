"""Build a run from a config: the checks made before any model loads, then the workers and
the controller. `protege.cli.main` (what every example calls) runs it."""

from __future__ import annotations

import signal
import socket
import sys

import torch

from protege.algorithms.registry import Algorithm, AlgorithmDefaults, distinct_plans
from protege.capabilities import config_problem, vllm_models_on_cpu, weight_sync_problem
from protege.config import Config
from protege.controller import Controller
from protege.data import (
    PromptSource,
    chat_template_on,
    read_jsonl,
    read_text_lines,
    require_completions,
)
from protege.errors import ProtegeError, SetupError
from protege.evaluation import Evaluator
from protege.fusion_config import fusion_problem, router_problem
from protege.fusion_data import row_labels, row_routes
from protege.launch import LocalLauncher
from protege.metrics_log import MetricsLog
from protege.modeling import check_same_chat_template, check_same_vocabulary, load_tokenizer
from protege.pipeline import Pipeline
from protege.preflight import check_paths, check_positions
from protege.privileged import check_view_positions, setup_problem, view_texts
from protege.resume import prepare_output_dir
from protege.rewards import check_rules
from protege.teacher_server import check_teacher_servers


def build_controller(config: Config) -> Controller:
    algorithm = config.build_algorithm()
    check_setup(config, algorithm)
    resume_from = prepare_output_dir(config)  # before any model loads or metrics.jsonl opens
    tokenizer = load_tokenizer(config.student.model)
    chat = chat_template_on(config.data, tokenizer, config.student.model)
    check_teacher_tokenizers(config, algorithm, tokenizer, chat)
    prompts = PromptSource(
        read_training_rows(config, algorithm),
        tokenizer,
        config.trainer.batch_size,
        seed=config.data.shuffle_seed,
        chat_template=chat,
        max_prompt_tokens=config.data.max_prompt_tokens,
        pretrain=read_pretrain(config, algorithm),
        overlong=config.data.overlong,
        system_prompt=config.data.system_prompt,
        teacher_views=view_texts(config),
    )
    prompts.routes = teacher_routes(config, algorithm, prompts)
    check_positions(config, prompts.longest_prompt)
    check_view_positions(config, prompts.longest_teacher_prompts)
    check_teacher_servers(config, algorithm, tokenizer, prompts.longest_prompt)
    for line in data_summary(config, prompts):
        print(f"[protege] {line}", file=sys.stderr, flush=True)
    evaluator = None
    if config.data.test:
        rows = read_jsonl(config.data.test)[: config.trainer.eval_size]
        evaluator = Evaluator.from_config(rows, tokenizer, config, chat_template=chat)
        reason = setup_problem(config, [], eval_teacher_kl=evaluator.teacher_kl)
        if reason:  # test rows without answers: evaluation measures KL to the teacher
            raise SetupError(reason)
    pipeline = Pipeline(config, make_launcher(config), master_port=free_port())
    log = MetricsLog(config)
    return Controller(config, pipeline, prompts, algorithm, evaluator, log, resume_from)


def teacher_routes(config: Config, algorithm: Algorithm, prompts: PromptSource):
    """Each training row's teacher index when several token-level teachers are routed by a
    data field (fusion.mode=route), else None; a row naming no known teacher fails here.
    fusion.mode=learned: the rows' labels, -1 where a row names none (router diagnostics)."""
    several = len(config.teachers) > 1 and algorithm.plan(0).teacher_need != "kv"
    names = [t.name for t in config.teachers]
    if several and config.fusion.mode == "learned":
        return row_labels(prompts.rows, names, config.fusion)
    if not several or config.fusion.mode != "route":
        return None
    return row_routes(prompts.rows, names, config.fusion)


def check_teacher_tokenizers(config: Config, algorithm: Algorithm, tokenizer, chat: bool) -> None:
    """Token-level teachers share the student's vocabulary (and, with the chat template on,
    its rendering); K-V teachers realign other tokenizers themselves."""
    if algorithm.plan(0).teacher_need == "kv":
        return
    if algorithm.plan(0).cross_tokenizer != "none":  # protege.xtok: re-read, not compared
        report_cross_tokenizer(config, tokenizer)
        return
    for teacher in config.teachers:
        if teacher.is_self or teacher.on_server:  # a server's tokenizer: check_teacher_servers
            continue
        theirs = load_tokenizer(teacher.model)
        try:
            check_same_vocabulary(tokenizer, theirs, teacher.name)
        except SetupError as error:
            raise SetupError(f"{error}, or distil across tokenizers: {CROSS_HINT}") from None
        if chat:
            check_same_chat_template(tokenizer, theirs, teacher.name, config.data.system_prompt)


CROSS_HINT = "algorithm.name=gkd algorithm.cross_tokenizer=gold (or uld)"


def report_cross_tokenizer(config: Config, tokenizer) -> None:
    from protege.xtok.checks import cross_tokenizer_report

    rows = read_jsonl(config.data.train)
    for teacher in config.teachers:
        line = cross_tokenizer_report(tokenizer, teacher.name, teacher.model, rows)
        print(f"[protege] {line}", file=sys.stderr, flush=True)


def data_summary(config: Config, prompts: PromptSource) -> list[str]:
    """The run's first lines: how many training rows; how many prompts were cut or dropped for
    being over data.max_prompt_tokens, hold characters the tokenizer cannot encode, or are
    repeated to fill a batch; then a line on each of the last two when there are any."""
    limit = f"data.max_prompt_tokens={config.data.max_prompt_tokens}"
    unknown, duplicates = prompts.unknown, prompts.fill_duplicates
    batch = config.trainer.batch_size
    first = (
        f"data.train: {len(prompts.rows)} rows from {config.data.train}; "
        f"{prompts.truncated} truncated on the left and {prompts.dropped} dropped "
        f"for being over {limit} (data.overlong={config.data.overlong}); "
        f"{unknown.rows} with characters the tokenizer cannot encode; "
        f"{duplicates} repeated prompts per batch"
    )
    lines = [first]
    if unknown.rows:
        lines.append(
            f"data.train: {unknown.rows} rows (the first at {unknown.first}) hold characters "
            f"the student's tokenizer cannot encode, so the model never sees them: "
            f"{unknown.describe()}; clean the data or use a tokenizer that covers them"
        )
    if duplicates:
        lines.append(
            f"data.train: {len(prompts.rows)} rows for trainer.batch_size={batch}: every batch "
            f"repeats rows ({duplicates} of its {batch} prompts are duplicates); add rows or "
            "lower trainer.batch_size"
        )
    return lines


def check_setup(config: Config, algorithm: Algorithm) -> None:
    """Refuse, before any model loads, what this configuration cannot run: a SetupError (or
    the ConfigError/DataError met) naming the key and the fix."""
    try:
        _check_setup(config, algorithm)
    except ProtegeError:
        raise
    except ValueError as error:  # the refusal texts of capabilities, rewards, the vLLM adapter
        raise SetupError(str(error)) from error


def _check_setup(config: Config, algorithm: Algorithm) -> None:
    check_rules(config.reward.rules)  # a bad rule fails now, not when the reward worker starts
    plans = distinct_plans(algorithm, max(config.trainer.steps, 1))
    reason = config_problem(config, plans)
    if reason:
        raise ValueError(reason)
    check_teachers(config, algorithm)
    method = algorithm.plan(0).cross_tokenizer
    if method != "none":
        from protege.xtok.checks import check_cross_tokenizer

        check_cross_tokenizer(config, method)
    check_paths(config)  # local model directories (read below), a writable output_dir
    models = vllm_models_on_cpu(config, torch.cuda.is_available())
    if models:  # reads each model's config.json only; vLLM itself is not imported
        from protege.actors.vllm_engine import cpu_head_size_problem

        reason = next(filter(None, map(cpu_head_size_problem, models)), None)
        if reason:
            raise ValueError(reason)


def check_teachers(config: Config, algorithm: Algorithm) -> None:
    """What the teachers' settings and the algorithm's plans cannot do together: K-V-only
    keys, privileged prompts (protege.privileged), cross-tokenizer with several teachers,
    and the fusion of several token-level teachers (protege.fusion)."""
    plans = distinct_plans(algorithm, max(config.trainer.steps, 1))
    kv = any(plan.teacher_need == "kv" for plan in plans)
    for spec in config.teachers:
        if spec.prefix and not kv:
            raise ValueError(
                f"teachers.{spec.name}.prefix is read only by K-V teachers (kv_distill)"
            )
        if kv and (spec.backend != "hf" or spec.is_self):
            raise ValueError(
                f"teacher {spec.name!r}: K-V outputs come from an HF teacher model "
                "(teacher.backend=hf, a model other than 'self')"
            )
    reason = setup_problem(config, plans, config.trainer.eval_teacher_kl)
    if reason:
        raise ValueError(reason)
    if len(config.teachers) > 1 and any(p.cross_tokenizer != "none" for p in plans):
        raise ValueError(
            f"algorithm.cross_tokenizer reads one teacher, but {len(config.teachers)} are set; "
            "keep one teacher (teachers.0) for cross-tokenizer distillation"
        )
    if len(config.teachers) > 1 and not kv:  # token-level: fused in the learner
        names, weights = [t.name for t in config.teachers], [t.weight for t in config.teachers]
        reason = fusion_problem(config.fusion, names, weights, plans) or router_problem(
            config.fusion,
            algorithm.name,
            config.reward.enabled,
            type(algorithm).advantages is not AlgorithmDefaults.advantages,
        )
        if reason:
            raise ValueError(reason)


def check_weight_sync(config: Config) -> None:
    reason = weight_sync_problem(config)
    if reason:
        raise ValueError(reason)


def read_training_rows(config: Config, algorithm: Algorithm):
    rows = read_jsonl(config.data.train)
    if any(p.source == "dataset" for p in distinct_plans(algorithm, config.trainer.steps)):
        require_completions(
            rows, config.data.train, f"algorithm {algorithm.name!r} (dataset responses)"
        )
    return rows


def read_pretrain(config: Config, algorithm: Algorithm) -> list[str] | None:
    if config.data.pretrain is None or algorithm.plan(0).pretrain_weight == 0:
        return None
    return read_text_lines(config.data.pretrain)


def make_launcher(config: Config):
    if config.trainer.workers == "local":
        return LocalLauncher()
    from protege.actors.ray_actors import RayLauncher

    trainer = config.trainer
    return RayLauncher(trainer.ray_address, trainer.placement_timeout_s)


def stop_on_sigterm(controller: Controller) -> None:
    """SIGTERM (a scheduler's preemption, `kill`) ends the step in flight, checkpoints and
    exits 0. Installed after Ray starts: Ray's own driver handler dumps a C stack (rc 134)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: controller.request_stop("SIGTERM"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def result_line(config: Config, result: dict[str, float]) -> str:
    """The run's last line: what evaluation measured before -> after training (accuracy on
    answered test rows, else the student's KL to the teacher per token)."""
    done = f"({config.algorithm['name']}, {config.trainer.steps} steps; final model in {config.output_dir}/final)"
    for key, what in (
        ("accuracy", "student accuracy"),
        ("reverse_kl", "reverse KL to the teacher"),
    ):
        before, after = result.get(f"eval_before/{key}"), result.get(f"eval_after/{key}")
        if after is not None:
            start = "n/a (resumed)" if before is None else f"{before:.3f}"
            return f"{what}: {start} -> {after:.3f} {done}"
    return f"trained {done}; no evaluation: set data.test to a JSONL of held-out prompts"
