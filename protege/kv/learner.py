"""The KV-distillation learner: `KVDistillModule` trained through the DeepSpeed `TrainingEngine`
(same machinery as the RL learner: torch AdamW, clipping, LR schedule), plus evaluation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from protege.actors.deepspeed_engine import TrainingEngine
from protege.kv.batch import KVBatch, make_batch
from protege.kv.config import KVDistillConfig
from protege.kv.extract import KVSpec, LayerKV
from protege.kv.layer_align import LayerMap
from protege.kv.loss import LossWeights, answer_token_nll, layer_weights
from protege.kv.model import KVDistillModule, StepOutput
from protege.modeling import load_model, load_tokenizer
from protege.tasks.tiny import greedy_accuracy


class KVLearner:
    def __init__(
        self,
        config: KVDistillConfig,
        teacher_specs: Sequence[KVSpec],
        layer_maps: Sequence[LayerMap],
        task_table: Tensor | None = None,
    ):
        self.config = config
        student = load_model(config.student)
        self.tokenizer = load_tokenizer(config.student)
        self.spec = KVSpec.from_config(student.config)
        self.module = KVDistillModule(
            student,
            self.spec,
            teacher_specs,
            layer_maps,
            config.align,
            config.fusion,
            train_projector=config.align.train_projector,
            task_table=task_table,
        )
        self.engine = TrainingEngine(self.module, config.learner, max(1, config.trainer.steps))
        self.weights = LossWeights(
            **config.loss.model_dump(include={"lambda_k", "lambda_v", "beta", "gamma", "delta"})
        )

    @property
    def student(self) -> torch.nn.Module:
        return self.module.student

    def layer_weights(self, step: int) -> list[float]:
        loss = self.config.loss
        return layer_weights(
            step,
            self.config.trainer.steps,
            self.spec.layers,
            loss.layer_warmup,
            loss.shallow_fraction,
        )

    def train(self, batch: KVBatch, teacher_kv: Sequence[LayerKV], step: int) -> StepOutput:
        """One optimizer step."""
        self.engine.module.train()
        out = self.engine.module(
            batch, teacher_kv, self.layer_weights(step), self.weights, self.config.distill
        )
        self.engine.backward(out.loss)
        result = self.engine.step()
        out.metrics.update({"learner/grad_norm": result.grad_norm, "learner/lr": result.lr})
        return out

    @torch.no_grad()
    def evaluate_kv(self, batch: KVBatch, teacher_kv: Sequence[LayerKV]) -> StepOutput:
        """The KV loss on held-out rows, every layer weighted 1 (no annealing)."""
        self.module.eval()
        out = self.module(batch, teacher_kv, [1.0] * self.spec.layers, self.weights, True)
        self.module.train()
        return out

    def accuracy(self, rows: list[dict[str, str]]) -> float:
        return greedy_accuracy(self.student, self.tokenizer, rows)

    @torch.no_grad()
    def perplexity(self, rows: list[dict[str, str]]) -> float:
        """exp(token-mean NLL of the gold completions, teacher-forced)."""
        self.student.eval()
        total, count = 0.0, 0.0
        for start in range(0, len(rows), 128):
            batch = make_batch(self.tokenizer, rows[start : start + 128])
            logits = self.student(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask.long(),
                position_ids=batch.positions,
            ).logits
            nll, mask = answer_token_nll(logits, batch.input_ids, batch.answer_mask)
            total, count = total + float(nll.sum()), count + float(mask.sum())
        self.student.train()
        return math.exp(total / max(count, 1.0))
