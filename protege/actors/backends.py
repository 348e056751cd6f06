"""Which worker class runs a role for a configured backend.

`hf` classes are imported eagerly; `vllm` ones only when asked for, so protege imports
and runs without vLLM installed.
"""

from __future__ import annotations

from protege.actors.sampler import HFSampler
from protege.actors.teacher import TeacherScorer


def sampler_class(backend: str) -> type:
    if backend == "hf":
        return HFSampler
    if backend == "vllm":
        from protege.actors.vllm_sampler import VLLMSampler

        return VLLMSampler
    raise ValueError(f"rollout.backend must be 'hf' or 'vllm', not {backend!r}")


def teacher_class(backend: str) -> type:
    if backend == "hf":
        return TeacherScorer
    if backend == "vllm":
        from protege.actors.vllm_teacher import VLLMTeacherScorer

        return VLLMTeacherScorer
    raise ValueError(f"teacher.backend must be 'hf' or 'vllm', not {backend!r}")
