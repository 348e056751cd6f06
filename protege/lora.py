"""The student's LoRA adapter, built from `student.lora` in one place: the learner and the
HF sampler wrap their models with it, and the vLLM sampler writes its adapter_config.json
from it, so all three hold the same adapter. peft is imported only when one is built."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from protege.config import LoraConfig

if TYPE_CHECKING:
    import peft

TASK_TYPE = "CAUSAL_LM"


def peft_config(lora: LoraConfig) -> peft.LoraConfig:
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=TASK_TYPE,
    )


def adapter_config_dict(lora: LoraConfig) -> dict[str, Any]:
    """The adapter_config.json peft's `save_pretrained` writes for this adapter (sets as
    lists, inference mode on), for engines that load adapters from directories."""
    config = peft_config(lora).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    config["inference_mode"] = True
    return config


def wrap_with_lora(model: torch.nn.Module, lora: LoraConfig, seed: int) -> torch.nn.Module:
    """The peft model over `model` with a fresh LoRA adapter injected in place (the base
    weights frozen, B = 0 so the adapter starts as the identity). Seeded, without touching
    the global RNG, so all data-parallel ranks start from the same adapter."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, peft_config(lora))
