"""The driver: owns no model, runs the loop over the workers."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from protege.algorithms.registry import Algorithm
from protege.checkpoint import latest_checkpoint, load_controller_state, save_controller_state
from protege.config import Config
from protege.data import PromptSource
from protege.evaluation import Evaluator
from protege.metrics_log import MetricsLog, phase_accounting
from protege.pipeline import Pipeline
from protege.records import PromptBatch
from protege.rollouts import RolloutQueue

PENDING_FILE = "pending_rollouts.pt"


class Controller:
    def __init__(
        self,
        config: Config,
        pipeline: Pipeline,
        prompts: PromptSource,
        algorithm: Algorithm,
        evaluator: Evaluator | None,
        log: MetricsLog,
    ):
        self.config, self.pipeline, self.prompts = config, pipeline, prompts
        self.algo, self.evaluator, self.log = algorithm, evaluator, log
        self.start_step = 0
        trainer = config.trainer
        self.rollouts = RolloutQueue(
            self.rollout, prompts, trainer.steps, trainer.max_staleness, self.checkpoint_due
        )

    def step(self, k: int) -> dict[str, float]:
        submitted = self.rollouts.take(k)  # submitted ahead when pipelining
        batch = self.pipeline.gather(submitted.shards, submitted.prompts)
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
        for teacher in self.pipeline.teachers:
            shards = teacher.score(shards, plan)
        return self.pipeline.reward(shards)

    def run(self, on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict:
        """Resume if asked, evaluate, train `trainer.steps` steps, evaluate, save.
        `on_step(k, row)` sees every step's metrics row as written to metrics.jsonl."""
        self.resume()
        before = self.evaluate("eval_before")
        for k in range(self.start_step, self.config.trainer.steps):
            started = time.perf_counter()
            metrics = self.step(k)
            row = self.record(k, metrics, time.perf_counter() - started)
            if on_step is not None:
                on_step(k, row)
            self.maybe_checkpoint(k)
        self.rollouts.clear()  # rollouts past the last step (filled for a checkpoint)
        self.pipeline.wait_sync()  # the last update has reached the samplers
        after = self.evaluate("eval_after")
        self.pipeline.save_final(str(Path(self.config.output_dir) / "final"))
        self.log.close()
        return {**before, **after}

    def record(self, k: int, metrics: dict[str, float], seconds: float) -> dict[str, float]:
        phases = {**self.pipeline.take_seconds(), "time/step": seconds}
        accounting = phase_accounting(
            phases, metrics, pipelined=self.config.trainer.max_staleness > 0
        )
        row = {"step": k, **metrics, **phases, **accounting}
        self.log.write(row)
        if metrics.get("learner/nonfinite") or not math.isfinite(metrics.get("learner/loss", 0.0)):
            self.log.warning(
                f"step {k}: non-finite loss or gradient; update skipped, weights untouched"
            )
        elif metrics.get("learner/empty_batch"):
            self.log.warning(f"step {k}: every response was empty; update skipped")
        if (
            self.evaluator
            and self.config.trainer.eval_every
            and (k + 1) % self.config.trainer.eval_every == 0
        ):
            self.evaluate("eval", step=k)
        return row

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
            path = Path(self.config.output_dir) / "checkpoints" / f"step_{k + 1:07d}"
            path.mkdir(parents=True, exist_ok=True)
            self.pipeline.save_checkpoint(str(path / "learner"))
            # Rollouts already sampled for later steps are part of the state: resampling them
            # after a resume would use newer weights than the uninterrupted run did.
            torch.save(self.rollouts.resolved(self.pipeline.resolve), path / PENDING_FILE)
            save_controller_state(path, k + 1, self.prompts, self.algo)

    def resume(self) -> None:
        if not self.config.trainer.resume:
            return
        path = latest_checkpoint(Path(self.config.output_dir) / "checkpoints")
        if path is None:
            self.log.warning("trainer.resume is set but no checkpoint exists yet; starting fresh")
            return
        self.pipeline.load_checkpoint(str(path / "learner"))
        self.start_step = load_controller_state(path, self.prompts, self.algo)
        if (path / PENDING_FILE).exists():
            self.rollouts.restore(torch.load(path / PENDING_FILE, weights_only=False))
        self.pipeline.sync_weights()
        self.log.warning(f"resumed from {path} at step {self.start_step}")
