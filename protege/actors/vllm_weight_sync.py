"""GPU weight sync: NCCL broadcast from learner rank 0 to the vLLM rollout engines.

Built on vLLM's weight-transfer API (`vllm.distributed.weight_transfer`, NCCL backend):
the learner side is vLLM's `NCCLTrainerWeightTransferEngine` fed by a `WeightSource` over
the live student (ZeRO-3 shards gathered one parameter at a time on every rank, sent by
rank 0), and the engine side is each `VLLMSampler` actor, driven through the client below.
Full weights only: a LoRA student ships its adapter through the object store (it is small,
and vLLM serves adapters from LoRA requests, not from broadcast base weights).

UNTESTED on GPU in this repository's CI (no GPU there); written from vLLM 0.32's API.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLTrainerInitInfo,
    NCCLTrainerWeightTransferEngine,
)

Items = Callable[[], Iterator[tuple[str, Tensor]]]  # (HF name, full tensor), gathered


class GatheredSource(WeightSource):
    """The learner's weights in checkpoint (HF) names: metadata from the module without
    gathering, iteration through `items` (a collective under ZeRO-3 that every rank runs),
    each tensor moved to this rank's GPU for the broadcast."""

    def __init__(self, module: torch.nn.Module, items: Items, device: torch.device) -> None:
        self._module, self._items, self._device = module, items, device

    def metadata(self) -> list[ParamMeta]:
        metas = []
        for name, value in self._module.state_dict(keep_vars=True).items():
            shape = tuple(getattr(value, "ds_shape", value.shape))  # ZeRO-3: the full shape
            metas.append(ParamMeta(name, value.dtype, shape))
        return metas

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        for name, tensor in self._items():
            yield name, tensor.to(self._device, non_blocking=True)


class SamplerGroupClient:
    """vLLM's weight-sync client protocol over protege's rollout actors. Each call fans
    out to every sampler and waits; sampler i's GPU workers take the NCCL ranks after
    rank 0 (the learner) and those of samplers before it."""

    def __init__(self, samplers: list[Any], receivers: list[int]) -> None:
        self.samplers, self.receivers = samplers, receivers
        self.version: int | None = None  # the learner version being sent

    def _all(self, calls: list[Any]) -> None:
        import ray  # the samplers are Ray actors here: NCCL sync needs the Ray launcher

        ray.get(calls)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        offsets = [1 + sum(self.receivers[:i]) for i in range(len(self.samplers))]
        self._all(
            [
                s.init_weight_transfer_engine.remote({"init_info": {**init_info, "rank_offset": o}})
                for s, o in zip(self.samplers, offsets)
            ]
        )

    def start_weight_update(self) -> None:
        self._all([s.start_weight_update.remote() for s in self.samplers])

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._all([s.update_weights.remote({"update_info": update_info}) for s in self.samplers])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = weight_version if weight_version is not None else str(self.version)
        self._all([s.finish_weight_update.remote(version) for s in self.samplers])


class WeightBroadcast:
    """One learner rank's end of the broadcast group; every rank calls `send`."""

    def __init__(
        self,
        module: torch.nn.Module,
        items: Items,
        samplers: list[Any],
        receivers: list[int],
        rank: int,
    ) -> None:
        device = torch.device("cuda", torch.cuda.current_device())
        self.client = SamplerGroupClient(samplers, receivers)
        info = NCCLTrainerInitInfo(
            master_address=_node_address(),
            master_port=_free_port(),
            world_size=1 + sum(receivers),
            rank=rank,
        )
        self.engine = NCCLTrainerWeightTransferEngine.trainer_init(
            info, client=self.client, source=GatheredSource(module, items, device)
        )

    def send(self, version: int) -> None:
        self.client.version = version
        self.engine.send_weights()

    def close(self) -> None:
        self.engine.shutdown()


def _node_address() -> str:
    """This node's address as the rollout actors reach it (Ray knows it)."""
    import ray

    return ray.util.get_node_ip_address()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])
