"""Peak memory of the calling process, for per-role metrics (`memory/<role>_peak_gib`).

Each worker reports the peak resident set of its own process (and the peak CUDA allocation
when it has a GPU). In-process runs (`trainer.workers=local`) share one process, so every
role reports the same figure: the job's peak. Shards and data-parallel ranks combine these
keys by their maximum (`PEAK_SUFFIX`).
"""

from __future__ import annotations

import resource
import sys

PEAK_SUFFIX = "_peak_gib"


def peak_metrics(role: str) -> dict[str, float]:
    """{`memory/<role>_peak_gib`: peak RSS, and `memory/<role>_gpu_peak_gib` on CUDA}."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 2**30 if sys.platform == "darwin" else 2**20  # bytes on macOS, KiB on Linux
    out = {f"memory/{role}{PEAK_SUFFIX}": rss / scale}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out[f"memory/{role}_gpu{PEAK_SUFFIX}"] = torch.cuda.max_memory_allocated() / 2**30
    return out
