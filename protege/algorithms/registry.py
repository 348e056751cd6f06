"""The one algorithm registry: a dict and a decorator.

Every algorithm is a frozen dataclass whose fields are its hyper-parameters (validated in
`__post_init__`) and that answers three questions:

* `plan(step) -> RolloutPlan` — how to sample this step and which teacher outputs to fetch;
* `advantages(batch) -> RolloutBatch` — per-token advantages before the update (or the
  batch unchanged for pure-loss algorithms);
* `loss(student, batch) -> (loss, metrics)` — inside the learner. `student` is a
  `protege.student.StudentForward`: `student.logits` [B,T,V] predict `batch.response_ids`,
  and hidden states, per-layer K/V, queries, a forward on extra text and the algorithm's
  trainable modules are there on demand. The loss is a sum over tokens divided by
  `batch.normaliser()`, and every metric is normalised the same way, so losses and metrics
  of micro-batches add up to those of the whole batch.

`AlgorithmDefaults` gives the optional parts (inherit it; it is not an algorithm):
* `modules(context) -> {name: nn.Module}` — trainable modules the learner builds once and
  trains, checkpoints and restores with the student (KV projectors, routers);
* `loss_for(step)` — the stateless per-step loss object the learner receives with the batch
  (an adaptive algorithm bakes its current parameters into it; default: the algorithm);
* `observe(metrics)` — the controller feeds every step's learner metrics back;
* `state_dict()` / `load_state_dict(state)` — the adaptive state, JSON only, checkpointed.
* `plan_variants()` — every plan `plan(step)` can return, when the algorithm knows them
  (`ConstantPlan`: one), so the start-up checks over all steps (`distinct_plans`) stop as
  soon as they have met each; None (default): they ask every step.
The controller's instance is the only stateful one.
"""

from __future__ import annotations

import dataclasses
import random
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

from torch import Tensor

from protege.errors import AlgorithmConfigError
from protege.records import RolloutBatch, RolloutPlan


class StepLoss(Protocol):
    def loss(self, student: Any, batch: RolloutBatch) -> tuple[Tensor, dict[str, float]]: ...


@runtime_checkable
class Algorithm(Protocol):
    name: ClassVar[str]

    def plan(self, step: int) -> RolloutPlan: ...

    def advantages(self, batch: RolloutBatch) -> RolloutBatch: ...

    def loss(self, student: Any, batch: RolloutBatch) -> tuple[Tensor, dict[str, float]]: ...

    def loss_for(self, step: int) -> StepLoss: ...

    def observe(self, metrics: dict[str, float]) -> None: ...

    def modules(self, context: ModuleContext) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class ModuleContext:
    """What an algorithm may read to build its trainable modules in the learner."""

    student_config: Any  # the student's HF config
    teacher_configs: tuple[Any, ...] = ()  # one HF config per teacher (None: the student itself)
    teacher_names: tuple[str, ...] = ()
    seed: int = 0
    # Where the models and training rows are, for modules calibrated on data (CKA layer maps)
    student_model: str = ""
    teacher_models: tuple[str, ...] = ()
    train_data: str | None = None


class AlgorithmDefaults:
    """The optional parts of an algorithm, for those that need none of them."""

    def advantages(self, batch: RolloutBatch) -> RolloutBatch:
        return batch

    def loss_for(self, step: int) -> StepLoss:
        return self  # type: ignore[return-value]

    def observe(self, metrics: dict[str, float]) -> None:
        return None

    def modules(self, context: ModuleContext) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")

    def plan_variants(self) -> tuple[RolloutPlan, ...] | None:
        return None


class ConstantPlan:
    """For algorithms whose plan is the same at every step (list it before AlgorithmDefaults)."""

    def plan_variants(self) -> tuple[RolloutPlan, ...]:
        return (self.plan(0),)  # type: ignore[attr-defined]


class MixedPolicyPlan:
    """For algorithms that train a step on the student's own samples with probability
    `lmbda`, drawn per step from `seed` (GKD, DistiLLM); they build a step's plan in
    `_plan(on_policy)`."""

    def plan(self, step: int) -> RolloutPlan:
        draw = random.Random(self.seed * 1_000_003 + step).random()  # type: ignore[attr-defined]
        return self._plan(draw < self.lmbda)  # type: ignore[attr-defined]

    def plan_variants(self) -> tuple[RolloutPlan, ...]:
        lmbda = self.lmbda  # type: ignore[attr-defined]
        kinds = [on for on, possible in ((True, lmbda > 0), (False, lmbda < 1)) if possible]
        return tuple(self._plan(on) for on in kinds)  # type: ignore[attr-defined]


def distinct_plans(algorithm: Algorithm, steps: int) -> tuple[RolloutPlan, ...]:
    """The distinct plans of steps 0 … steps−1, in order of first use. A run may ask for
    `trainer.steps=10**7`: asking every step would cost minutes and a plan object per step,
    so the walk stops once it has met every one of the algorithm's `plan_variants()`."""
    variants = getattr(algorithm, "plan_variants", lambda: None)()
    seen: dict[RolloutPlan, None] = {}
    for step in range(steps):
        seen.setdefault(algorithm.plan(step), None)
        if variants is not None and len(seen) >= len(set(variants)):
            break
    return tuple(seen)


ALGORITHMS: dict[str, type] = {}

A = TypeVar("A", bound=type)


def register(name: str) -> Callable[[A], A]:
    """Class decorator: make a frozen dataclass available under `algorithm.name: <name>`."""

    def decorate(cls: A) -> A:
        if name in ALGORITHMS:
            raise ValueError(f"algorithm {name!r} is already registered by {ALGORITHMS[name]}")
        if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):
            raise TypeError(f"algorithm {name!r} must be a frozen dataclass")
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return decorate


def build_algorithm(params: dict[str, Any]) -> Algorithm:
    """Construct the algorithm named by params['name'] from the other keys, checking names,
    types and ranges; errors name the offending key."""
    params = dict(params)
    name = params.pop("name", None)
    if not isinstance(name, str) or name not in ALGORITHMS:
        known = ", ".join(sorted(ALGORITHMS))
        raise AlgorithmConfigError("name", f"unknown algorithm {name!r}; registered: {known}")
    cls = ALGORITHMS[name]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key, value in params.items():
        if key not in fields:
            raise AlgorithmConfigError(
                key, f"unknown key for {name!r}; valid keys: {', '.join(sorted(fields))}"
            )
        if not _matches(value, hints[key]):
            raise AlgorithmConfigError(key, f"expected {_type_name(hints[key])}, got {value!r}")
    try:
        return cls(**params)
    except ValueError as error:
        raise AlgorithmConfigError(str(getattr(error, "field", "")), str(error)) from None


class FieldError(ValueError):
    """Raised from `__post_init__`: names the field so config errors carry the key path."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field


def check(condition: bool, field: str, message: str) -> None:
    """`__post_init__` helper: raise FieldError(field, message) unless condition holds."""
    if not condition:
        raise FieldError(field, message)


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin in (tuple, list):
        return isinstance(value, (tuple, list))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))
