"""What only a CUDA machine can check (`pytest -m gpu`, run by benchmarks/gpu_check.sh):
DeepSpeed's engine training on the GPU in fp32 and bf16, ZeRO-3's gathered weights against
ZeRO-0's after the same update, and learner weights broadcast over NCCL into a vLLM rollout
engine, checked by log-prob parity. Skipped without CUDA (the CPU twins of these tests run
in the ordinary tiers)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from protege.actors.learner import Learner
from tests.test_learner import assert_weights_equal, make_batch, make_config, weights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.*` is deprecated:FutureWarning"),
]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepspeed_learner_trains_on_cuda(tiny_dirs, precision):
    """The GKD loss on one fixed batch falls over five steps, with the engine on the GPU."""
    torch.cuda.reset_peak_memory_stats()
    learner = Learner(make_config(tiny_dirs, precision=precision))
    batch = make_batch(tiny_dirs)
    losses = [learner.train(batch)["learner/loss"] for _ in range(5)]
    assert torch.cuda.max_memory_allocated() > 0, "the learner never touched the GPU"
    assert losses[-1] < losses[0], losses


def test_zero3_gathers_the_weights_zero0_computes(tiny_dirs):
    """ZeRO-3 partitions every parameter; its gathered state dict after two updates equals
    the unpartitioned engine's (fp32, same batches, same order)."""
    batches = [make_batch(tiny_dirs, seed=seed) for seed in range(2)]
    results = {}
    for stage in (0, 3):
        learner = Learner(make_config(tiny_dirs, zero_stage=stage))
        for batch in batches:
            learner.train(batch)
        results[stage] = weights(learner)
    assert_weights_equal(results[3], results[0], atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")
def test_nccl_weight_broadcast_reaches_the_vllm_engine(tmp_path):
    """Two GKD steps over Ray with vLLM rollouts on the GPU and `weight_sync=nccl`; then the
    engine's log-probs of its own tokens equal the learner's recompute on its current
    weights (max |Δ| <= 1e-3 nats, fp32): the broadcast delivered every tensor."""
    from protege.config import load_config
    from protege.run import build_controller

    config = load_config(
        "gkd",
        [
            "student.model=builtin:tiny/student_h32",
            "trainer.workers=ray",
            "trainer.steps=3",
            "trainer.batch_size=8",
            "rollout.backend=vllm",
            "rollout.weight_sync=nccl",
            "rollout.num_gpus=0.3",
            "rollout.gpu_memory_utilization=0.2",
            "learner.num_gpus=0.3",
            "learner.lr=1e-2",  # updates large enough that stale weights would show
            "data.test=null",
            "logging.wandb=disabled",
            "logging.progress=false",
            f"output_dir={tmp_path}",
        ],
    )
    controller = build_controller(config)
    pipeline = controller.pipeline
    for k in range(2):
        controller.step(k)
    pipeline.wait_sync()
    prompts = controller.prompts.next(2)
    batch = pipeline.gather(controller.rollout(2, prompts), prompts)
    recomputed = pipeline.launcher.get(pipeline.learners[0].recompute_logprobs.remote(batch))
    mask = batch.response_mask
    gap = (batch.student_logprobs - recomputed.to(batch.student_logprobs.device))[mask].abs()
    assert float(gap.max()) <= 1e-3, float(gap.max())
