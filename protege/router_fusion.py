"""The learner's side of `fusion.mode: learned`: build the router, and turn a micro-batch
into the [n,B,T] weights `protege.fusion.fuse_batch` mixes the teachers with (while the
router accumulates its gradient on the same rows). The router itself is `protege.router`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from protege.errors import SetupError
from protege.modeling import load_model
from protege.records import RolloutBatch
from protege.router import FusionRouter, prompt_features, sequence_logprobs


def learned_router(config, algorithm, student_config, device) -> FusionRouter | None:
    """The run's router (seeded: the same on every rank), or None when the run has no
    learned fusion (one teacher, K-V teachers, or another fusion mode)."""
    several = len(config.teachers) > 1 and algorithm.plan(0).teacher_need != "kv"
    if not several or config.fusion.mode != "learned":
        return None
    prior = [spec.weight for spec in config.teachers]
    reader = None
    if config.fusion.router.features == "initial":
        reader = load_model(config.student.model, config.student.dtype).to(device).eval()
        reader.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.trainer.seed)
        options = config.fusion.router
        return FusionRouter(student_config.hidden_size, prior, options, device, reader)


def routed_weights(
    router: FusionRouter, module: nn.Module, micro: RolloutBatch, config, learn: bool
) -> Tensor:
    """[n,B,T] weights of `micro.named_teachers` (in that order): the router's α per row, or
    the prior during `fusion.router.warmup_steps`. With `learn`, the router back-propagates
    this micro-batch's share of its loss."""
    order = [spec.name for spec in config.teachers]  # the router's teacher order
    missing = [name for name in order if micro.named_teachers[name].logprobs is None]
    if missing:
        raise SetupError(
            f"fusion.mode=learned scores responses by each teacher's log-probs of the sampled "
            f"tokens, but teachers {missing} sent none"
        )
    logprobs = torch.stack([micro.named_teachers[name].logprobs for name in order])
    sequence_logp = sequence_logprobs(logprobs, micro.response_mask)
    reader = router.reader if router.reader is not None else module
    features = prompt_features(reader, micro.prompt_ids, micro.prompt_mask)
    if learn:
        alpha = router.accumulate(features, sequence_logp, micro.rewards, micro.teacher_route)
    else:
        with torch.no_grad():
            alpha = router.log_weights(features).exp()
    if micro.step < config.fusion.router.warmup_steps:
        alpha = router.prior.exp().expand_as(alpha)
    columns = [order.index(name) for name in micro.named_teachers]
    width = micro.response_mask.shape[1]
    return alpha[:, columns].t().unsqueeze(-1).expand(-1, -1, width).clone()
