"""The one module that imports DeepSpeed: a training engine built from `LearnerConfig`.

The learner sees `TrainingEngine`: forward through `.module`, `backward(loss)` per
micro-batch, one `step()` per training batch, checkpoints and gathered weights. DeepSpeed
owns ZeRO partitioning, gradient reduction over data-parallel ranks, clipping, bf16 master
weights and the LR schedule.

CPU start-up: DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op
(`deepspeed_shm_comm`, 45-100 s with g++) the first time a process creates its
communication backend. That op only serves DeepSpeed-inference's `inference_all_reduce`;
training reduces gradients through torch.distributed (gloo), so `_skip_shm_comm_op` marks
it unbuildable in DeepSpeed's op-compatibility table, and initialisation takes ~1 s.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import Tensor

from protege.actors.step_result import StepResult
from protege.config import LearnerConfig

deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO lines drown the progress output


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    """One process group per process: gloo on CPU, nccl on GPU (DeepSpeed's accelerator
    decides). A single rank uses an in-memory store, so it binds no port."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    # DeepSpeed reads LOCAL_RANK for its device; each learner actor sees one device, index 0.
    os.environ.setdefault("LOCAL_RANK", "0")
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise RuntimeError(
                f"this process already joined a process group as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}; cannot become rank {rank} of {world_size}"
            )
        return
    backend = get_accelerator().communication_backend_name()
    if world_size == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
        )


def lr_multiplier(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Factor on the base LR at optimizer step `step` (0-based): linear warm-up over
    `warmup_steps`, then constant, linear decay to 0 or cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule {schedule!r}; expected constant, linear or cosine")


def deepspeed_config(config: LearnerConfig, world_size: int) -> dict[str, Any]:
    guarded = _self_guarded(config)
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": config.micro_batch_size * world_size,
        # The learner owns the accumulation boundary: any number of micro-batch backwards,
        # then one step() per training batch.
        "managed_gradient_accumulation": False,
        "gradient_clipping": 0.0 if guarded else config.max_grad_norm,
        "zero_optimization": {"stage": config.zero_stage},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW: nothing to JIT-compile
        "bf16": {"enabled": config.precision == "bf16", "check_grad_overflow": True},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class TrainingEngine:
    """A DeepSpeed engine around `model`, trained with AdamW on its trainable parameters;
    this rank joins the data-parallel process group first."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: LearnerConfig,
        total_steps: int,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int = 29500,
    ):
        init_distributed(rank, world_size, master_addr, master_port)
        _skip_shm_comm_op()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the student has no trainable parameters")
        adamw = {"lr": config.lr, "weight_decay": config.weight_decay, "fused": _fusable(params)}
        if _self_guarded(config):
            optimizer = GuardedAdamW(params, max_grad_norm=config.max_grad_norm, **adamw)
        else:
            optimizer = torch.optim.AdamW(params, **adamw)
        schedule = functools.partial(
            lr_multiplier,
            schedule=config.lr_schedule,
            warmup_steps=config.warmup_steps,
            total_steps=total_steps,
        )
        self.world_size = world_size
        self._engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            # DeepSpeed steps the schedule only on applied (finite) steps, and checkpoints it.
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=deepspeed_config(config, world_size),
        )
        if world_size == 1 and config.zero_stage == 0:
            # One rank has nothing to reduce, yet DeepSpeed would flatten every gradient into
            # one buffer and copy it back at each step (0.3 s a step for a 67M student on CPU).
            self._engine.enable_backward_allreduce = False

    @property
    def module(self) -> torch.nn.Module:
        """The model to call for forwards (the DeepSpeed engine: ZeRO-3 gathers on the way)."""
        return self._engine

    @property
    def lr(self) -> float:
        return float(self._engine.get_lr()[0])

    def backward(self, loss: Tensor) -> None:
        """Accumulate d(loss)/dθ. DeepSpeed averages gradients over data-parallel ranks, while
        each rank's loss is already normalised by the global token count, so the loss is
        scaled by world_size: the reduced gradient is then the whole batch's."""
        self._engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self) -> StepResult:
        """Reduce, clip and apply the accumulated gradients, or drop them on every rank when
        their global norm is not finite."""
        lr = self.lr
        self._engine.step()
        norm = self._engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        return StepResult(applied=self._engine.was_step_applied(), grad_norm=norm, lr=lr)

    def weights_finite(self) -> bool:
        """Every trainable weight finite, on every rank (an overflowing update, e.g. a huge
        lr, can make them inf behind a finite gradient). Under ZeRO-3 each rank checks its
        shards; the answer is reduced over ranks so all agree."""
        params = [p for p in self._engine.module.parameters() if p.requires_grad]
        tensors = [getattr(p, "ds_tensor", p) for p in params]
        # A tensor holding an inf or a nan sums to one; a finite one sums to a finite float32
        # unless |sum| > 3.4e38 (weights no run can use). One read per tensor, no bool copy:
        # 16x cheaper than isfinite().all() on CPU.
        sums = [t.sum(dtype=torch.float32) for t in tensors if t.numel()]
        finite = bool(torch.stack(sums).isfinite().all()) if sums else True  # one device sync
        return self.all_reduce(float(finite), "min") == 1.0

    def all_reduce(self, value: float, op: str) -> float:
        """`value` summed ("sum"), maxed ("max") or minimised ("min") over data-parallel ranks."""
        if self.world_size == 1:
            return value
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        device = get_accelerator().current_device_name()
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=ops[op])
        return float(tensor.item())

    def all_reduce_tensor(self, tensor: Tensor) -> Tensor:
        """`tensor` summed over data-parallel ranks (a copy; the input is left as it was)."""
        if self.world_size == 1:
            return tensor
        device = get_accelerator().current_device_name()
        summed = tensor.detach().to(device=device, dtype=torch.float64).clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed.to(device=tensor.device, dtype=tensor.dtype)

    def gathered_state_dict(
        self, keep: Callable[[str], bool] = lambda name: True, prefix: str = "", copy: bool = True
    ) -> dict[str, Tensor]:
        """The model's state dict as full CPU tensors (ZeRO-3 shards gathered one parameter at
        a time; every rank must call this under ZeRO-3); with `prefix`, only names under it,
        with the prefix removed. `copy=False` returns the live CPU weights themselves (no
        0.25 GiB copy of a 65M-parameter model) for a caller that reads them before the next
        step: one that serializes or saves them at once."""
        return dict(self.gathered_items(keep, prefix, copy))

    def gathered_items(
        self, keep: Callable[[str], bool], prefix: str = "", copy: bool = True
    ) -> Iterator[tuple[str, Tensor]]:
        values = self._engine.module.state_dict(keep_vars=True)
        tied = _listed_twice(values.values())
        copies: dict[tuple, Tensor] = {}  # a tied weight (listed twice) is copied once
        for name, value in values.items():
            if not name.startswith(prefix):
                continue
            name = name[len(prefix) :]
            if not keep(name):
                continue
            if hasattr(value, "ds_id"):  # a ZeRO-3 partitioned parameter
                with deepspeed.zero.GatheredParameters([value], modifier_rank=None):
                    yield name, _on_cpu(value, copy=True)  # the gathered storage is freed
            elif _identity(value) in tied:
                yield name, copies.setdefault(_identity(value), _on_cpu(value, copy))
            else:  # streamed: nothing is kept once the caller moves on
                yield name, _on_cpu(value, copy)

    def save_checkpoint(self, path: str, client_state: dict[str, Any]) -> None:
        """Model, optimizer, LR schedule and `client_state`; every rank must call it."""
        self._engine.save_checkpoint(
            path,
            tag=CHECKPOINT_TAG,
            client_state=client_state,
            exclude_frozen_parameters=self._has_frozen(),
        )

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Restore what `save_checkpoint` wrote; returns its `client_state`. Frozen weights
        (a LoRA base) are not in the checkpoint: they come from the student path."""
        load_path, client_state = self._engine.load_checkpoint(
            path, tag=CHECKPOINT_TAG, load_module_strict=not self._has_frozen()
        )
        if load_path is None:
            raise FileNotFoundError(f"no learner checkpoint under {path!r}")
        return client_state

    def _has_frozen(self) -> bool:
        return any(not p.requires_grad for p in self._engine.module.parameters())


CHECKPOINT_TAG = "learner"


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that clips to `max_grad_norm` and skips the update when the gradient norm is
    not finite. ZeRO 1-3 and bf16 check the norm inside DeepSpeed; plain fp32 ZeRO-0 hands
    the optimizer the raw reduced gradients, so the guard lives here. DeepSpeed reads
    `overflow` (skip: no LR-schedule step, gradients zeroed) and `_global_grad_norm`."""

    def __init__(self, params, *, max_grad_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.overflow = False
        self._global_grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm))
        self._global_grad_norm = norm
        self.overflow = not math.isfinite(norm)
        if self.overflow:
            self._global_grad_norm = float("inf")
            return None
        return super().step(closure)


def _fusable(params: list[torch.Tensor]) -> bool:
    """Torch's fused AdamW (one kernel over all parameters: 0.557 -> 0.119 s a step for
    SmolLM2's 67M-parameter student on one CPU thread, benchmarks/fused_adamw.py) takes
    float tensors on CPU or CUDA."""
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def _self_guarded(config: LearnerConfig) -> bool:
    return config.zero_stage == 0 and config.precision == "fp32"


def _skip_shm_comm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory inference all-reduce (see the
    module docstring); DeepSpeed consults this table before building any op."""
    builder = get_accelerator().get_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def _identity(value: Tensor) -> tuple:
    return (value.device, value.data_ptr(), value.dtype, tuple(value.shape))


def _listed_twice(values: Iterable[Tensor]) -> set[tuple]:
    """The identities of tensors a state dict lists under more than one name."""
    seen: set[tuple] = set()
    twice: set[tuple] = set()
    for value in values:
        key = _identity(value)
        (twice if key in seen else seen).add(key)
    return twice


def _on_cpu(value: Tensor, copy: bool) -> Tensor:
    """`value` detached on the CPU: a copy of its own with `copy` (moving it off an
    accelerator is one already), else the CPU tensor itself."""
    value = value.detach()
    if value.device.type != "cpu":
        return value.cpu()
    return value.clone() if copy else value
