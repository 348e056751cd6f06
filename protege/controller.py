"""The driver: owns no model, runs the loop over the workers."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from protege.algorithms.registry import Algorithm
from protege.checkpoint import latest_checkpoint, load_controller_state, save_controller_state
from protege.config import Config
from protege.data import PromptSource
from protege.evaluation import Evaluator
from protege.metrics_log import MetricsLog, phase_accounting
from protege.records import PromptBatch, RolloutBatch
from protege.workers import PendingRollout, WorkerGroup

PENDING_FILE = "pending_rollouts.pt"


class Controller:
    def __init__(
        self,
        config: Config,
        workers: WorkerGroup,
        prompts: PromptSource,
        algorithm: Algorithm,
        evaluator: Evaluator | None,
        log: MetricsLog,
    ):
        self.config, self.workers, self.prompts = config, workers, prompts
        self.algo, self.evaluator, self.log = algorithm, evaluator, log
        self.start_step = 0
        self.pending: dict[int, PendingRollout] = {}  # rollouts submitted ahead, by step
        self.drawn: dict[int, PromptBatch] = {}  # prompts drawn ahead (while the learner works)

    def step(self, k: int) -> dict[str, float]:
        batch = self.rollout(
            k
        )  # plan -> generate -> score -> reward (submitted ahead when pipelining)
        batch = self.algo.advantages(batch)  # pass-through for pure-loss algorithms
        training = self.workers.submit_train(batch)
        self.submit_ahead(k)  # with trainer.max_staleness > 0 later rollouts overlap this update
        metrics = self.workers.collect_train(training)
        self.workers.sync_weights(wait=False)  # samplers load it before their next rollout
        return {**metrics, **batch.extras}

    def rollout(self, k: int) -> RolloutBatch:
        """Step k's batch: sampled, teacher-scored and rewarded."""
        pending = self.pending.pop(k, None) or self.submit_rollout(k)
        return self.workers.collect_rollout(pending)

    def submit_rollout(self, k: int) -> PendingRollout:
        prompts = self.drawn.pop(k, None) or self.prompts.next(k)
        return self.workers.submit_rollout(prompts, self.algo.plan(k))

    def submit_ahead(self, k: int) -> None:
        """Submit the rollouts of steps k+1 .. k+max_staleness not yet submitted. They sample
        with the weights the samplers hold now, which miss step k's update (and later ones)
        by the time they are trained on: at most `max_staleness` updates stale. Their
        behaviour and student log-probs are the sampling policy's, which the importance
        weights and PPO ratios of the policy-gradient losses divide by. A checkpoint step
        fills the pipeline even past the last step: a run resumed from it, and trained
        longer, must find the rollouts the uninterrupted run sampled."""
        last = k + self.config.trainer.max_staleness
        if not self.checkpoint_due(k):
            last = min(last, self.config.trainer.steps - 1)
        for j in range(k + 1, last + 1):
            if j not in self.pending:
                self.pending[j] = self.submit_rollout(j)
        after = max(last, k) + 1  # the first step not submitted: tokenise its prompts now
        if (
            after < self.config.trainer.steps
            and not self.checkpoint_due(k)
            and after not in self.drawn
        ):
            self.drawn[after] = self.prompts.next(after)

    def run(
        self, on_step: Callable[[int, dict[str, float]], None] | None = None
    ) -> dict[str, float]:
        """Resume if asked, evaluate, train `trainer.steps` steps, evaluate, save. `on_step(k,
        row)` sees each step's metrics row as written to metrics.jsonl (benchmarks hook here)."""
        self.resume()
        before = self.evaluate("eval_before")
        for k in range(self.start_step, self.config.trainer.steps):
            started = time.perf_counter()
            metrics = self.step(k)
            row = self.record(k, metrics, time.perf_counter() - started)
            if on_step is not None:
                on_step(k, row)
            self.maybe_checkpoint(k)
        self.pending.clear()  # rollouts past the last step (filled for a checkpoint)
        self.workers.wait_sync()  # the last update has reached the samplers
        after = self.evaluate("eval_after")
        self.workers.save_final(str(Path(self.config.output_dir) / "final"))
        self.log.close()
        return {**before, **after}

    def record(self, k: int, metrics: dict[str, float], seconds: float) -> dict[str, float]:
        phases = {**self.workers.take_seconds(), "time/step": seconds}
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
        with self.workers.timed_apart():
            result = {
                f"{prefix}/{key}": value for key, value in self.evaluator.run(self.workers).items()
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
            self.workers.save_checkpoint(str(path / "learner"))
            # Rollouts already sampled for later steps are part of the state: resampling them
            # after a resume would use newer weights than the uninterrupted run did.
            self.pending = {j: self.workers.resolve(p) for j, p in self.pending.items()}
            torch.save(self.pending, path / PENDING_FILE)
            save_controller_state(path, k + 1, self.prompts, self.algo)

    def resume(self) -> None:
        if not self.config.trainer.resume:
            return
        path = latest_checkpoint(Path(self.config.output_dir) / "checkpoints")
        if path is None:
            self.log.warning("trainer.resume is set but no checkpoint exists yet; starting fresh")
            return
        self.workers.load_checkpoint(str(path / "learner"))
        self.start_step, self.algo = load_controller_state(path, self.prompts)
        if (path / PENDING_FILE).exists():
            self.pending = torch.load(path / PENDING_FILE, weights_only=False)
        self.workers.sync_weights()
        self.log.warning(f"resumed from {path} at step {self.start_step}")
