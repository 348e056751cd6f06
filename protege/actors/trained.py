"""What the learner's engine trains and the small pieces of a training pass: the student
with the algorithm's modules in one container, those modules built alike on every rank, a
batch moved to the device, the zero-gradient padding pass's inputs, and eval mode for a
scoring pass inside training.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor

from protege.algorithms.registry import ModuleContext
from protege.config import Config
from protege.modeling import load_model_config
from protege.records import RolloutBatch, lm_targets


def on_device(batch: RolloutBatch, device: torch.device) -> RolloutBatch:
    if device.type == "cpu":
        return batch
    tensors = {
        f.name: getattr(batch, f.name).to(device, non_blocking=True)
        for f in dataclasses.fields(batch)
        if isinstance(getattr(batch, f.name), Tensor)
    }
    named = {
        name: payload.map(lambda t: t.to(device, non_blocking=True))
        for name, payload in batch.named_teachers.items()
    }
    return batch.replace(**tensors, named_teachers=named)


def local_lm_targets(batch: RolloutBatch) -> float:
    return 0.0 if batch.pretrain_mask is None else float(lm_targets(batch.pretrain_mask).sum())


class StudentWithModules(torch.nn.Module):
    """What the engine trains: the student and the algorithm's modules. Its forward is the
    student's; the modules are called by the loss (`StudentForward.modules`)."""

    def __init__(self, student: torch.nn.Module, extras: dict[str, torch.nn.Module]):
        super().__init__()
        self.student = student
        self.extras = torch.nn.ModuleDict(extras)

    def forward(self, **inputs):
        return self.student(**inputs)


def build_algorithm_modules(
    algorithm, config: Config, student_config
) -> dict[str, torch.nn.Module]:
    """The algorithm's trainable modules, built the same on every rank (seeded)."""
    teachers = tuple(
        None if spec.is_self or spec.on_server else load_model_config(spec.model)
        for spec in config.teachers
    )
    context = ModuleContext(
        student_config,
        teachers,
        tuple(t.name for t in config.teachers),
        config.trainer.seed,
        student_model=config.student.model,
        teacher_models=tuple(t.model for t in config.teachers),
        train_data=config.data.train,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.trainer.seed)
        return dict(algorithm.modules(context))


def padding_inputs(device: torch.device) -> dict[str, Tensor]:
    one = torch.zeros(1, 1, dtype=torch.long, device=device)
    return {
        "input_ids": one,
        "attention_mask": torch.ones_like(one),
        "position_ids": one,
        "use_cache": False,
    }


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
