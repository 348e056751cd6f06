"""Which worker class runs a role for a configured backend.

The worker modules are imported only when asked for, so choosing a class costs nothing
for the other backend; what each backend can run is `protege.capabilities`' business.
"""

from __future__ import annotations

from protege.capabilities import unknown_backend


def sampler_class(backend: str) -> type:
    if backend == "hf":
        from protege.actors.sampler import HFSampler

        return HFSampler
    if backend == "vllm":
        from protege.actors.vllm_sampler import VLLMSampler

        return VLLMSampler
    raise ValueError(unknown_backend("rollout", backend))


def teacher_class(backend: str) -> type:
    if backend == "hf":
        from protege.actors.teacher import TeacherScorer

        return TeacherScorer
    if backend == "vllm":
        from protege.actors.vllm_teacher import VLLMTeacherScorer

        return VLLMTeacherScorer
    if backend == "server":
        from protege.actors.server_teacher import ServerTeacherScorer

        return ServerTeacherScorer
    raise ValueError(unknown_backend("teacher", backend))
