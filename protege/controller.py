"""The driver: owns no model, runs the loop over the workers."""

from __future__ import annotations

import math
import time
from pathlib import Path

from protege.algorithms.registry import Algorithm
from protege.checkpoint import latest_checkpoint, load_controller_state, save_controller_state
from protege.config import Config
from protege.data import PromptSource
from protege.evaluation import Evaluator
from protege.metrics_log import MetricsLog
from protege.workers import WorkerGroup


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

    def step(self, k: int) -> dict[str, float]:
        plan = self.algo.plan(k)  # who samples, which teacher outputs
        batch = self.workers.generate(self.prompts.next(k), plan)
        batch = self.workers.score(batch, plan)
        batch = self.workers.reward(batch)  # no-op when no reward is configured
        batch = self.algo.advantages(batch)  # pass-through for pure-loss algorithms
        metrics = self.workers.train(batch)
        self.workers.sync_weights()
        return {**metrics, **batch.extras}

    def run(self) -> dict[str, float]:
        """Resume if asked, evaluate, train `trainer.steps` steps, evaluate, save."""
        self.resume()
        before = self.evaluate("eval_before")
        for k in range(self.start_step, self.config.trainer.steps):
            started = time.perf_counter()
            metrics = self.step(k)
            self.record(k, metrics, time.perf_counter() - started)
            self.maybe_checkpoint(k)
        after = self.evaluate("eval_after")
        self.workers.save_final(str(Path(self.config.output_dir) / "final"))
        self.log.close()
        return {**before, **after}

    def record(self, k: int, metrics: dict[str, float], seconds: float) -> None:
        row = {"step": k, **metrics, **self.workers.take_seconds(), "time/step": seconds}
        self.log.write(row)
        if metrics.get("learner/nonfinite") or not math.isfinite(metrics.get("learner/loss", 0.0)):
            self.log.warning(f"step {k}: non-finite loss or gradient; update skipped, weights untouched")
        elif metrics.get("learner/empty_batch"):
            self.log.warning(f"step {k}: every response was empty; update skipped")
        if self.evaluator and self.config.trainer.eval_every and (k + 1) % self.config.trainer.eval_every == 0:
            self.evaluate("eval", step=k)

    def evaluate(self, prefix: str, step: int | None = None) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        result = {f"{prefix}/{key}": value for key, value in self.evaluator.run(self.workers).items()}
        self.log.write({"step": step if step is not None else -1, **result})
        return result

    def maybe_checkpoint(self, k: int) -> None:
        every = self.config.trainer.save_every
        if every and (k + 1) % every == 0:
            path = Path(self.config.output_dir) / "checkpoints" / f"step_{k + 1:07d}"
            path.mkdir(parents=True, exist_ok=True)
            self.workers.save_checkpoint(str(path / "learner"))
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
        self.workers.sync_weights()
        self.log.warning(f"resumed from {path} at step {self.start_step}")
