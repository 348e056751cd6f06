"""The driver: owns no model, runs the loop over the workers."""

from __future__ import annotations

import math
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protege.algorithms.registry import Algorithm
from protege.checkpoint import (
    load_controller_state,
    save_controller_state,
    write_atomically,
    write_checkpoint,
)
from protege.config import Config
from protege.data import PromptSource
from protege.errors import ProtegeError
from protege.evaluation import Evaluator
from protege.fusion import driver_logprobs
from protege.launch import WorkerDied
from protege.metrics_log import MetricsLog, phase_accounting
from protege.pipeline import Pipeline
from protege.records import PromptBatch
from protege.resume import config_hash, saved_config
from protege.rollout_files import load_rollouts, save_rollouts
from protege.rollouts import RolloutQueue
from protege.teachers import scoring_plan


class TrainingStopped(ProtegeError):
    """The run stopped on bad numerics; the message names the step, the cause and the last
    good checkpoint."""


class WorkerLost(ProtegeError):
    """A worker died beyond recovery (a learner rank, or a worker out of restarts); the
    message names it, the step, the checkpoint to resume from and the command."""


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint; the message says where and how
    to resume (the CLI prints it and exits 0)."""


class Controller:
    def __init__(
        self,
        config: Config,
        pipeline: Pipeline,
        prompts: PromptSource,
        algorithm: Algorithm,
        evaluator: Evaluator | None,
        log: MetricsLog,
        resume_from: Path | None = None,
    ):
        """`resume_from`: a verified checkpoint (`protege.resume.prepare_output_dir`)."""
        self.config, self.pipeline, self.prompts = config, pipeline, prompts
        self.algo, self.evaluator, self.log = algorithm, evaluator, log
        self.resume_from, self.start_step = resume_from, 0
        self.bad_steps = 0  # consecutive steps skipped for a non-finite loss or gradient
        self.last_checkpoint: Path | None = resume_from
        self.stop_signal: str | None = None  # set by a signal handler: stop after this step
        self.current_step = -1
        trainer = config.trainer
        self.rollouts = RolloutQueue(
            self.rollout, prompts, trainer.steps, trainer.max_staleness, self.checkpoint_due
        )

    def step(self, k: int) -> dict[str, float]:
        submitted = self.rollouts.take(k)  # submitted ahead when pipelining
        batch = self.pipeline.gather(submitted.shards, submitted.prompts)
        batch = driver_logprobs(batch, self.config, self.algo.plan(k).temperature)  # teachers
        batch = self.algo.advantages(batch)  # pass-through for pure-loss algorithms
        training = self.pipeline.train(batch, self.algo.loss_for(k))
        self.rollouts.submit_ahead(k)  # with trainer.max_staleness > 0 they overlap this update
        metrics = self.pipeline.wait_train(training)
        self.algo.observe(metrics)  # adaptive algorithms update their state
        self.pipeline.sync_weights(wait=False)  # samplers load it before their next rollout
        return {**metrics, **batch.extras}

    def rollout(self, k: int, prompts: PromptBatch) -> list[Any]:
        """Submit step k's plan -> generate -> score (each teacher) -> reward; returns one
        future per shard without waiting."""
        plan = self.algo.plan(k)
        shards = self.pipeline.generate(prompts, plan)
        teachers = self.pipeline.teachers
        for teacher in teachers:
            shards = teacher.score(shards, scoring_plan(plan, teachers, teacher))
        return self.pipeline.reward(shards)

    def run(self, on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict:
        """Resume if asked, evaluate, train `trainer.steps` steps, evaluate, save.
        `on_step(k, row)` sees every step's metrics row as written to metrics.jsonl. A resumed
        run keeps the first run's eval_before row instead of evaluating again."""
        try:
            if self.resume_from is not None:
                self.resume(self.resume_from)
            before = {} if self.resume_from else self.evaluate("eval_before")
            for k in range(self.start_step, self.config.trainer.steps):
                self.current_step = k
                started = time.perf_counter()
                metrics = self.step(k)
                row = self.record(k, metrics, time.perf_counter() - started)
                if on_step is not None:
                    on_step(k, row)
                self.check_numerics(k, metrics)
                self.maybe_checkpoint(k)
                if self.stop_signal:
                    self.stop_on_signal(k)
            self.rollouts.clear()  # rollouts past the last step (filled for a checkpoint)
            self.pipeline.wait_sync()  # the last update has reached the samplers
            # Logged at step `steps`, after the last training step: wandb refuses a step that
            # goes back, and would drop the final evaluation.
            after = self.evaluate("eval_after", step=self.config.trainer.steps)
            self.save_final()
        except WorkerDied as died:
            raise WorkerLost(self.lost_message(died)) from None
        finally:
            self.log.close()
        return {**before, **after}

    def request_stop(self, signal_name: str) -> None:
        """From a signal handler: finish the step in flight, checkpoint, stop (a second
        signal stops at once)."""
        if self.stop_signal:
            raise SystemExit(f"{signal_name} again: stopped without a checkpoint")
        self.stop_signal = signal_name
        self.log.warning(f"{signal_name}: stopping after the step in flight, with a checkpoint")

    def stop_on_signal(self, k: int) -> None:
        if not self.checkpoint_due(k) or self.bad_steps:
            self.rollouts.submit_drawn()
            self.write_checkpoint(k)
        where = self.last_checkpoint or "no checkpoint (a run of non-finite steps)"
        raise Interrupted(
            f"{self.stop_signal}: stopped after step {k} ({k + 1}/{self.config.trainer.steps} "
            f"done); checkpoint {where}. Resume with: {resume_command()}"
        )

    def lost_message(self, died: WorkerDied) -> str:
        """What died, when, what is kept and how to go on."""
        steps = self.config.trainer.steps
        k = self.current_step
        when = f"in step {k} (trainer.steps={steps})" if k >= 0 else "before step 0"
        kept = (
            f"the newest checkpoint, {self.last_checkpoint}, is intact"
            if self.last_checkpoint
            else "no checkpoint was written yet (trainer.save_every)"
        )
        return f"{died}; the run stopped {when}; {kept}. Resume with: {resume_command()}"

    def record(self, k: int, metrics: dict[str, float], seconds: float) -> dict[str, float]:
        phases = {**self.pipeline.take_seconds(), "time/step": seconds}
        accounting = phase_accounting(
            phases, metrics, pipelined=self.config.trainer.max_staleness > 0
        )
        row = {"step": k, **metrics, **phases, **accounting}
        self.log.write(row)
        if metrics.get("learner/empty_batch"):
            self.log.warning(f"step {k}: every response was empty; update skipped")
        if (
            self.evaluator
            and self.config.trainer.eval_every
            and (k + 1) % self.config.trainer.eval_every == 0
        ):
            self.evaluate("eval", step=k)
        return row

    def check_numerics(self, k: int, metrics: dict[str, float]) -> None:
        """Stop on weights that became non-finite, or after `trainer.max_bad_steps` skipped
        (non-finite loss or gradient) steps in a row; nothing is saved from such a state."""
        good = (
            f"the last good checkpoint is {self.last_checkpoint}"
            if self.last_checkpoint
            else ("no checkpoint was written (trainer.save_every)")
        )
        if metrics.get("learner/nonfinite_weights"):
            raise TrainingStopped(
                f"step {k}: the student's weights are not finite after the update (grad norm "
                f"{metrics.get('learner/grad_norm')}, lr {metrics.get('learner/lr')}); stopped "
                f"without saving; {good}. Lower learner.lr or learner.max_grad_norm"
            )
        skipped = metrics.get("learner/nonfinite") or not math.isfinite(
            metrics.get("learner/loss", 0.0)
        )
        self.bad_steps = self.bad_steps + 1 if skipped else 0
        if not skipped:
            return
        self.log.warning(
            f"step {k}: non-finite loss or gradient; update skipped, weights untouched"
        )
        most = self.config.trainer.max_bad_steps
        if most and self.bad_steps >= most:
            raise TrainingStopped(
                f"step {k}: {self.bad_steps} steps in a row had a non-finite loss or gradient "
                f"(trainer.max_bad_steps={most}); stopped; {good}"
            )

    def evaluate(self, prefix: str, step: int | None = None) -> dict[str, float]:
        """Evaluation's worker calls are timed apart (`time/eval` in its own row), so they never
        count towards a training step's phases."""
        if self.evaluator is None:
            return {}
        started = time.perf_counter()
        with self.pipeline.timed_apart():
            result = {
                f"{prefix}/{key}": value for key, value in self.evaluator.run(self.pipeline).items()
            }
        seconds = {f"time/{prefix}": time.perf_counter() - started}
        self.log.write({"step": step if step is not None else -1, **result, **seconds})
        return result

    def checkpoint_due(self, k: int) -> bool:
        every = self.config.trainer.save_every
        return bool(every) and (k + 1) % every == 0

    def maybe_checkpoint(self, k: int) -> None:
        if self.checkpoint_due(k):
            self.write_checkpoint(k)

    def write_checkpoint(self, k: int) -> None:
        """The state after step k (unless in a run of non-finite steps)."""
        if self.bad_steps:  # keep the last checkpoint from before the non-finite steps
            self.log.warning(f"step {k}: no checkpoint during a run of non-finite steps")
            return
        config = self.config
        meta = {
            "config_hash": config_hash(config),
            "algorithm": self.algo.name,
            "student_model": config.student.model,
            "config": saved_config(config),
        }
        self.last_checkpoint = write_checkpoint(
            Path(config.output_dir) / "checkpoints",
            k + 1,
            lambda folder: self.write_state(folder, k + 1),
            meta,
            keep_last=config.trainer.keep_last,
        )

    def write_state(self, folder: Path, next_step: int) -> None:
        self.pipeline.save_checkpoint(str(folder / "learner"))
        # Rollouts already sampled for later steps are part of the state: resampling them
        # after a resume would use newer weights than the uninterrupted run did.
        save_rollouts(folder, self.rollouts.resolved(self.pipeline.resolve))
        save_controller_state(folder, next_step, self.prompts, self.algo)

    def resume(self, path: Path) -> None:
        """Load a checkpoint whose manifest `prepare_output_dir` verified (so the learner's
        pickled DeepSpeed files are the ones this run wrote)."""
        self.pipeline.load_checkpoint(str(path / "learner"))
        self.start_step = load_controller_state(path, self.prompts, self.algo)
        self.rollouts.restore(load_rollouts(path))
        self.pipeline.sync_weights()
        self.log.warning(f"resumed from {path} at step {self.start_step}")

    def save_final(self) -> None:
        """`final/`, written atomically; the learner refuses non-finite weights."""
        final = Path(self.config.output_dir) / "final"
        try:
            write_atomically(final, lambda folder: self.pipeline.save_final(str(folder)))
        except ValueError as error:
            self.log.warning(f"{final} not written: {error}")
            raise


def resume_command() -> str:
    """This process's command line with `trainer.resume=auto` (resumes from the newest
    complete checkpoint, or starts fresh where there is none)."""
    argv = [arg for arg in sys.argv if not arg.startswith("trainer.resume=")]
    return shlex.join([sys.executable, *argv, "trainer.resume=auto"])
