"""The output head of frozen float32 CPU models through oneDNN's matmul.

PyTorch's CPU `nn.Linear` in float32 calls MKL's sgemm, which is slow for the output head's
shape: few rows (a decoding step has one per sequence) against a tall [V, D] weight. On the
2-core AMD machine this project is measured on, SmolLM2's [49152, 576] head takes 39 ms
for 8 rows on 2 threads through MKL and 21 ms through oneDNN
(`torch.ops.mkldnn._linear_pointwise` on the same weight, no packed copy, so weight updates
are seen at once); single-threaded 40 vs 36 ms, and 350 vs 289 ms for 256 rows
(benchmarks/results/onednn_head.md). The two differ by float32 rounding only (~1e-6
relative).

`fast_output_head` swaps that kernel into a model's head when nothing needs its gradient:
the sampler's student (weights copied in place at every sync) and frozen teachers. Anything
else — gradients wanted, another dtype or device, a LoRA-wrapped or custom head, a torch
build without the op or where it disagrees with `nn.Linear` — keeps `nn.Linear`'s forward.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

_TOLERANCE = 1e-4  # relative to the output's scale, for the one-off self-check


class OneDNNLinear(torch.nn.Linear):
    """nn.Linear (same parameters, state dict and ties) whose gradient-free float32 CPU
    forward runs oneDNN's matmul."""

    def forward(self, x: Tensor) -> Tensor:
        if _fast_path(x, self.weight):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return super().forward(x)


def fast_output_head(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its output head's class switched to OneDNNLinear (in place: the head
    keeps its parameters, so a head tied to the input embeddings stays tied) when the head
    is a plain float32 CPU nn.Linear and oneDNN's matmul works in this torch."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is torch.nn.Linear and _eligible(head.weight) and onednn_matches():
        head.__class__ = OneDNNLinear
    return model


def _eligible(weight: Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def _fast_path(x: Tensor, weight: Tensor) -> bool:
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return not wants_grad and _eligible(weight) and x.dtype == torch.float32 and x.is_cpu


@functools.cache
def onednn_matches() -> bool:
    """Whether this torch has the op and it agrees with nn.Linear on a random head-shaped
    product (checked once per process)."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 2, 64, generator=g), torch.randn(257, 64, generator=g)
    try:
        ours = op(x, weight, None, "none", [], "")
    except (RuntimeError, NotImplementedError):
        return False
    reference = torch.nn.functional.linear(x, weight)
    scale = reference.abs().max().item()
    return (
        ours.shape == reference.shape
        and (ours - reference).abs().max().item() <= _TOLERANCE * scale
    )
