"""The learner: one data-parallel rank of the student's training (a Ray actor wraps it).

Each `train(batch)` is one optimizer step on this rank's shard: the batch is cut into
micro-batches, every micro-batch's loss (normalised by the global token count, so losses
add up) is back-propagated, and the accumulated gradient is applied once. DeepSpeed lives
behind `protege.actors.deepspeed_engine`; this module never imports it.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedModel

from protege.actors.step_result import StepResult
from protege.actors.teacher import emitted_ids, rows_within_budget, teacher_outputs
from protege.actors.trained import (
    StudentWithModules,
    build_algorithm_modules,
    eval_mode,
    local_lm_targets,
    on_device,
    padding_inputs,
)
from protege.algorithms.registry import StepLoss
from protege.capabilities import (
    HIDDEN_NOT_FROM_SELF_TEACHER,
    NCCL_NOT_WITH_LORA,
    SELF_TEACHER_NEEDS_LORA,
)
from protege.config import Config
from protege.fusion import fuse_batch, teacher_metrics
from protege.lora import wrap_with_lora as _with_lora
from protege.memory import peak_metrics
from protege.modeling import load_model, load_tokenizer, vocab_size
from protege.privileged import scored_on_view
from protege.records import RolloutBatch, RolloutPlan, WeightUpdate
from protege.router import step_totals
from protege.router_fusion import learned_router, routed_weights
from protege.student import StudentForward
from protege.teacher_head import TeacherHead

STUDENT = "student."  # the student's parameter names inside the trained container


class NonFiniteWeights(ValueError):
    """The student's weights hold inf or NaN; they are not saved."""


class Learner:
    """The student under training: DeepSpeed ZeRO, optional LoRA, any registered algorithm,
    plus the algorithm's own trainable modules (trained, saved and restored with it)."""

    def __init__(
        self,
        config: Config,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int = 29500,
    ):
        self.config = config
        self.rank, self.world_size = rank, world_size
        from protege.actors.deepspeed_engine import TrainingEngine  # DeepSpeed: in the worker only

        self.algorithm = config.build_algorithm()  # stateless default loss; builds modules
        model = load_model(config.student.model, config.student.dtype)
        if config.student.lora.enabled:
            model = _with_lora(model, config.student.lora, seed=config.trainer.seed)
        self._model = model  # the (peft-wrapped) student; forwards go through the engine
        extras = build_algorithm_modules(self.algorithm, config, model.config)
        self._trained = StudentWithModules(model, extras)
        self._engine = TrainingEngine(
            self._trained,
            config.learner,
            config.trainer.steps,
            rank,
            world_size,
            master_addr,
            master_port,
        )
        self._engine.module.train()
        self._version = 0
        self._teacher_head: TeacherHead | None = None  # loaded for the first hidden states
        self._heads: dict[str, TeacherHead] = {}  # several teachers' heads, by name
        self._vocab: int | None = None  # ids the student's tokenizer emits (top-k fusion)
        self._router = learned_router(config, self.algorithm, model.config, self._device())

    @property
    def version(self) -> int:
        """Optimizer steps applied so far (skipped steps do not count)."""
        return self._version

    @property
    def model(self) -> torch.nn.Module:
        """The live student (peft-wrapped with LoRA; under ZeRO-3 its parameters are shards)."""
        return self._model

    @property
    def algorithm_modules(self) -> torch.nn.ModuleDict:
        """The algorithm's trainable modules (empty when it declares none)."""
        return self._trained.extras

    @property
    def lora(self) -> bool:
        return self.config.student.lora.enabled

    # -- training ------------------------------------------------------------------------
    def train(self, batch: RolloutBatch, loss: StepLoss | None = None) -> dict[str, float]:
        """One optimizer step on this rank's shard with `loss` (the controller's per-step
        loss object; default: the configured algorithm); returns loss and algorithm metrics,
        and `learner/seconds` spent in it (worker-side: free of transport and queueing).

        A batch without response tokens, or whose loss or gradient norm is not finite, is a
        skipped step: the weights and the optimizer state stay untouched.
        """
        started = time.perf_counter()
        metrics = self._step(batch, loss if loss is not None else self.algorithm)
        seconds = time.perf_counter() - started
        return {**metrics, "learner/seconds": seconds, **peak_metrics("learner")}

    def _step(self, batch: RolloutBatch, step_loss: StepLoss) -> dict[str, float]:
        batch = batch.replace(
            token_count=self._global_count(batch.token_count, batch.num_response_tokens),
            pretrain_token_count=self._global_count(
                batch.pretrain_token_count, local_lm_targets(batch)
            ),
        )
        if batch.normaliser() == 0:
            return self._metrics(
                batch, StepResult(applied=False, grad_norm=0.0, lr=self._engine.lr), 0.0, empty=True
            )
        # learner.micro_batch_size rows, fewer when their logits would pass the budget
        rows = rows_within_budget(self._model, batch, self.config.learner.micro_batch_size)
        micro_batches = batch.split(rows)
        # ZeRO-2/3 communicate inside forward/backward: every rank runs as many passes.
        count = int(self._engine.all_reduce(len(micro_batches), "max"))
        totals: dict[str, float] = {"learner/loss": 0.0}
        if self._router is not None:  # fusion.mode=learned: one router update per step
            self._router.begin(step_totals(batch.rewards, batch.teacher_route, self._summed))
        for index in range(count):
            if index < len(micro_batches):
                loss, metrics = self._loss_pass(micro_batches[index], step_loss, learn=True)
            else:
                loss, metrics = self._padding_pass(), {}
            totals["learner/loss"] += loss.item()
            if not math.isfinite(totals["learner/loss"]):
                # Drop the whole step, not just this micro-batch: NaN gradients make the
                # global norm non-finite, so the optimizer guard skips the step on every rank
                # (under ZeRO-2/3 the other micro-batches' gradients are already reduced).
                loss = loss * math.nan
            self._engine.backward(loss)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
        result = self._engine.step()
        if self._router is not None:
            totals.update(self._router.finish(self._engine.all_reduce_tensor))
        self._version += int(result.applied)
        metrics = self._metrics(batch, result, totals.pop("learner/loss"))
        # An applied step can still overflow the weights (a huge lr): nothing saves them then.
        metrics["learner/nonfinite_weights"] = float(
            result.applied and not self._engine.weights_finite()
        )
        return {**metrics, **totals}

    def _loss_pass(
        self, micro: RolloutBatch, step_loss: StepLoss, learn: bool = False
    ) -> tuple[Tensor, dict]:
        """The loss of one micro-batch; `learn`: inside a training step (the learned router
        accumulates its gradient too)."""
        micro = on_device(micro, self._device())  # the loss reads teacher outputs, masks, ...
        fused = None
        if micro.named_teachers:  # several teachers: one fused target, per micro-batch
            micro, fused = self._fused(micro, learn)
        if micro.teacher_hidden is not None:  # teacher_need "hidden": exact logits, per micro
            micro = self.teacher_head.decode(micro)
        student = StudentForward(
            self._engine.module,
            micro,
            self._trained.extras,
            config=self._model.config,
            chunk_tokens=self.config.learner.loss_chunk_tokens,
        )
        loss, metrics = step_loss.loss(student, micro)
        if fused is not None:
            metrics = {**metrics, **teacher_metrics(student.logits, micro, *fused)}
        return loss, metrics

    def _fused(self, micro: RolloutBatch, learn: bool = False) -> tuple[RolloutBatch, tuple]:
        """`micro` with its teachers' outputs fused into the standard fields (protege.fusion),
        and what the per-teacher metrics read."""
        temperature = self.algorithm.plan(micro.step).temperature
        if self._vocab is None:
            self._vocab = emitted_ids(self.config.student.model, vocab_size(self._model))
        weights = {spec.name: spec.weight for spec in self.config.teachers}
        mix = None
        if self._router is not None:
            mix = routed_weights(self._router, self._engine.module, micro, self.config, learn)
        fused, mix, payloads = fuse_batch(
            micro, self.config.fusion, weights, temperature, self._vocab, self._decode_hidden, mix
        )
        return fused, (list(micro.named_teachers), payloads, mix, temperature)

    def _decode_hidden(self, name: str, hidden: Tensor, mask: Tensor) -> Tensor:
        """One named teacher's hidden states -> its logits, with its own frozen head."""
        if name not in self._heads:
            spec = next(t for t in self.config.teachers if t.name == name)
            if spec.is_self:
                raise ValueError(HIDDEN_NOT_FROM_SELF_TEACHER)
            self._heads[name] = TeacherHead.load(spec.model, spec.dtype, self._device())
        with torch.no_grad():
            return self._heads[name].logits(hidden, mask)

    @property
    def teacher_head(self) -> TeacherHead:
        """The frozen output head of the first teacher (the one token-level losses read),
        loaded once on this rank; never trained, checkpointed or sent to samplers."""
        if self._teacher_head is None:
            teacher = self.config.teacher
            if teacher.is_self:
                raise ValueError(HIDDEN_NOT_FROM_SELF_TEACHER)
            self._teacher_head = TeacherHead.load(teacher.model, teacher.dtype, self._device())
        return self._teacher_head

    def _padding_pass(self) -> Tensor:
        """A zero-gradient pass that keeps ZeRO's collectives in step when this rank has
        fewer micro-batches than another."""
        if self._router is not None and self._router.reader is None:  # as the other ranks
            with torch.no_grad():
                self._engine.module(**padding_inputs(self._device()))
        logits = self._engine.module(**padding_inputs(self._device())).logits
        return logits.sum() * 0.0

    def _summed(self, local: float) -> float:
        return self._engine.all_reduce(local, "sum")

    def _global_count(self, known: float | None, local: float) -> float:
        if known is not None:
            return float(known)
        return self._engine.all_reduce(local, "sum")

    def _metrics(
        self, batch: RolloutBatch, step: StepResult, loss: float, empty: bool = False
    ) -> dict[str, float]:
        return {
            "learner/loss": loss,
            "learner/grad_norm": step.grad_norm,
            "learner/lr": step.lr,
            "learner/tokens": batch.num_response_tokens,
            "learner/skipped": float(not step.applied),
            "learner/nonfinite": float(not step.applied and not empty),
            "learner/empty_batch": float(empty),
            "learner/nonfinite_weights": 0.0,
            "learner/version": float(self._version),
        }

    def _device(self) -> torch.device:
        return next(self._engine.module.parameters()).device

    # -- `protege check` -----------------------------------------------------------------
    def recompute_logprobs(self, batch: RolloutBatch) -> Tensor:
        """log q_θ(y_t) [B,T] of the batch's responses under the learner's weights, from a
        teacher-forced forward (the sampler's `student_logprobs` should equal it)."""
        plan = RolloutPlan(teacher_need="sampled")
        with eval_mode(self._engine.module), torch.no_grad():
            scored = teacher_outputs(
                self._engine.module, batch, plan, self.config.learner.micro_batch_size
            )
        return scored.teacher_logprobs.cpu()

    def self_scored(self, batch: RolloutBatch, plan: RolloutPlan) -> RolloutBatch:
        """`batch` with the teacher outputs `plan` asks for computed by the student itself."""
        with eval_mode(self._engine.module), torch.no_grad():
            return teacher_outputs(
                self._engine.module, batch, plan, self.config.learner.micro_batch_size
            )

    def loss_value(self, batch: RolloutBatch, step_loss: StepLoss) -> float:
        """The loss of `batch` without an update (no gradient, no optimizer step)."""
        with torch.no_grad():
            loss, _ = self._loss_pass(batch, step_loss)
        return float(loss)

    # -- LoRA self-distillation -----------------------------------------------------------
    def score_as_teacher(self, batch: RolloutBatch, plan: RolloutPlan) -> RolloutBatch:
        """Teacher outputs from the student's own base model (LoRA adapter disabled)."""
        if not self.lora:
            raise ValueError(SELF_TEACHER_NEEDS_LORA)
        with self._model.disable_adapter(), eval_mode(self._engine.module):
            return scored_on_view(batch, plan, self._teacher_pass(plan))

    def score_live(self, batch: RolloutBatch, plan: RolloutPlan) -> RolloutBatch:
        """Teacher outputs from the student's current weights (adapter on), no gradient: a
        live self-teacher, on its privileged prompt (protege.privileged)."""
        with eval_mode(self._engine.module):
            return scored_on_view(batch, plan, self._teacher_pass(plan))

    def _teacher_pass(self, plan: RolloutPlan):
        size = self.config.teacher.micro_batch_size
        return lambda view: teacher_outputs(self._engine.module, view, plan, size)

    # -- weights and checkpoints ----------------------------------------------------------
    def export_weights(self, snapshot: bool = True) -> WeightUpdate:
        """Weights for the samplers: the full state dict (HF names), or with LoRA only the
        adapter (peft names); under ZeRO-3 every rank must call it. `snapshot=False`: the live
        weights uncopied, for a caller that serializes them at once (a Ray actor's result)."""
        tensors = self._adapter_state_dict() if self.lora else self.state_dict(copy=snapshot)
        return WeightUpdate(version=self._version, tensors=tensors, lora_only=self.lora)

    def weights_version(self) -> int:
        """`version`, as a call: queued after an `export_weights`, the version it exported."""
        return self._version

    def init_weight_broadcast(self, samplers: list, receivers: list[int]) -> None:
        """Join the NCCL group with the vLLM rollout engines (`rollout.weight_sync=nccl`):
        rank 0 sends, sampler i brings `receivers[i]` GPU workers. Every rank must call it.
        Untested on GPU here (no GPU in CI); see protege.actors.vllm_weight_sync."""
        if self.lora:
            raise ValueError(NCCL_NOT_WITH_LORA)
        from protege.actors.vllm_weight_sync import WeightBroadcast

        items = functools.partial(self._engine.gathered_items, lambda name: True, STUDENT)
        self._broadcast = WeightBroadcast(self._model, items, samplers, receivers, self.rank)

    def broadcast_weights(self) -> int:
        """Send the live weights to the rollout engines over NCCL and return their version;
        every rank must call it (ZeRO-3 gathers are collective), rank 0 sends."""
        if getattr(self, "_broadcast", None) is None:
            raise ValueError("broadcast_weights needs init_weight_broadcast first")
        self._broadcast.send(self._version)
        return self._version

    def state_dict(self, copy: bool = True) -> dict[str, Tensor]:
        """Every weight of the live student as full CPU tensors (peft names with LoRA); under
        ZeRO-3 every rank must call it. `copy=False`: TrainingEngine.gathered_state_dict's."""
        return self._engine.gathered_state_dict(prefix=STUDENT, copy=copy)

    def _adapter_state_dict(self) -> dict[str, Tensor]:
        from peft import get_peft_model_state_dict

        gathered = self._engine.gathered_state_dict(
            keep=lambda name: "lora_" in name, prefix=STUDENT
        )
        return get_peft_model_state_dict(self._model, state_dict=gathered)

    def save_checkpoint(self, path: str) -> None:
        """Everything needed to resume exactly; every rank must call it. Refused for
        non-finite weights (a checkpoint of them could only be resumed into a broken run)."""
        self._require_finite_weights(path)
        state = {"version": self._version, "torch_rng": torch.get_rng_state()}
        self._engine.save_checkpoint(path, state)
        if self._router is not None and self.rank == 0:  # identical on every rank
            self._router.save(path)

    def load_checkpoint(self, path: str) -> None:
        """DeepSpeed unpickles its files (torch.load(weights_only=False)): load only a
        checkpoint whose manifest was verified (`protege.checkpoint.verify`)."""
        state = self._engine.load_checkpoint(path)
        self._version = int(state["version"])
        if self._router is not None:
            self._router.load(path)
        torch.set_rng_state(state["torch_rng"])

    def save_final(self, path: str) -> None:
        """An HF model directory (LoRA merged when `student.lora.merge_on_save`, else a peft
        adapter directory) plus the student's tokenizer. Under ZeRO-3 every rank must call it.
        Refused when a weight is not finite: an inf/NaN model is never saved as a result."""
        self._require_finite_weights(path)
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        lora = self.config.student.lora
        if self.lora and lora.merge_on_save:
            self._merged_copy().save_pretrained(out)
        elif self.lora:
            self._model.save_pretrained(out, state_dict=self._adapter_state_dict())
        else:
            self._model.save_pretrained(out, state_dict=self.state_dict(copy=False))
        load_tokenizer(self.config.student.model).save_pretrained(out)

    def _require_finite_weights(self, path: str) -> None:
        if not self._engine.weights_finite():
            raise NonFiniteWeights(
                f"refusing to save {path}: the student's weights are not finite (an update "
                "overflowed; lower learner.lr); the last good checkpoint is left as it was"
            )

    def _merged_copy(self) -> PreTrainedModel:
        """A fresh base model with the trained adapter merged in; the live model is untouched."""
        from peft import set_peft_model_state_dict

        student = self.config.student
        copy = _with_lora(load_model(student.model, student.dtype), student.lora, seed=0)
        set_peft_model_state_dict(copy, self._adapter_state_dict())
        return copy.merge_and_unload()
