"""Many tensors as one byte buffer, for records that cross actor boundaries pickled.

torch pickles every tensor on its own (~50-150 µs
each: a storage object, a rebuild call); a batch or a state dict holds dozens. Packing
them into one uint8 buffer makes pickling one memcpy, and Ray ships the buffer out of
band (pickle protocol 5) without a further copy. Measured on the tiny student's state
dict (27 tensors): dumps 1.9 ms -> 0.08 ms, loads 4.8 ms -> 0.3 ms.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_ALIGN = 16  # every tensor starts at a multiple of this many bytes (any dtype can view it)


def pack_tensors(
    tensors: dict[str, Tensor],
) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...], int]], object]:
    """([(name, dtype, shape, byte offset)], one numpy uint8 buffer) for CPU copies of `tensors`."""
    import numpy as np

    layout, parts, offset = [], [], 0
    for name, tensor in tensors.items():
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        layout.append((name, tensor.dtype, tuple(tensor.shape), offset))
        padding = -data.numel() % _ALIGN
        parts.append(data)
        if padding:
            parts.append(torch.zeros(padding, dtype=torch.uint8))
        offset += data.numel() + padding
    buffer = torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.uint8)
    return layout, buffer


def unpack_tensors(
    layout: list[tuple[str, torch.dtype, tuple[int, ...], int]], buffer
) -> dict[str, Tensor]:
    """Inverse of `pack_tensors`: tensors that are views of one private copy of the buffer
    (writable; the received buffer may be read-only shared memory)."""
    flat = torch.from_numpy(buffer.copy())
    out = {}
    for name, dtype, shape, offset in layout:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        out[name] = flat[offset : offset + size].view(dtype).view(shape)
    return out
