"""bfloat16 weights of frozen models on CPUs that have no bfloat16 arithmetic.

`teacher.dtype=bfloat16` asks for a teacher half the size. On a GPU, or a CPU with
AVX512-BF16/AMX, torch computes in bfloat16 natively. Elsewhere (AVX2 CPUs) bfloat16
matmuls are emulated: one SmolLM2-135M scoring forward of 8 x 72 tokens took 18.1 s against
2.8 s in float32. There the frozen model keeps its decoder layers' linear weights in
bfloat16 (the bulk of the parameters) and computes in float32, converting each weight as its
layer runs; embeddings, norms and the output head are float32 copies of the bfloat16-rounded
values, so every weight is what a bfloat16 model holds and every activation is float32.
Measured on the SmolLM2 teacher, single-threaded: parameters 0.50 -> 0.30 GiB, one scoring
forward 2.8 -> 3.2 s, reverse KL to the float32 teacher 1.2e-4 nats per token (emulated
bfloat16: 2.7e-3) (benchmarks/results/cpu_bf16.md).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


class UpcastLinear(torch.nn.Linear):
    """nn.Linear whose (bfloat16) weight and bias are converted to the input's dtype for
    each call: a float32 product of bfloat16-stored weights."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def stores_only(dtype: torch.dtype, device: str | torch.device) -> bool:
    """Whether a `dtype` model on `device` should store bfloat16 and compute float32."""
    return dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not native_bf16_cpu()


def bf16_storage(model: torch.nn.Module) -> torch.nn.Module:
    """A bfloat16-loaded `model`, in place, made to compute in float32: every plain
    nn.Linear but the output head keeps bfloat16 weights and becomes an UpcastLinear; every
    other parameter and floating buffer becomes float32 (a tied head with its embedding)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    stored = set()
    for module in model.modules():
        if type(module) is torch.nn.Linear and module is not head:
            module.__class__ = UpcastLinear
            stored.update(id(p) for p in module.parameters(recurse=False))
    for parameter in model.parameters():
        if id(parameter) not in stored and parameter.dtype == torch.bfloat16:
            parameter.data = parameter.data.float()
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.dtype == torch.bfloat16:
                setattr(module, name, buffer.float())
    return model


def compute_dtype(dtype: torch.dtype, device: str | torch.device) -> torch.dtype:
    """The dtype a frozen `dtype` model on `device` computes in (float32 where bfloat16 is
    only stored): a teacher's head on the learner reads hidden states in it."""
    return torch.float32 if stores_only(dtype, device) else dtype
