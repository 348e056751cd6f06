"""Rollout sampling on the vLLM backend: the same interface as `HFSampler`.

The engine runs in this process (inside the Ray actor). Each sampled token keeps its
log-prob under the distribution that drew it (vLLM's processed log-probs: after
temperature and top-p) as `behaviour_logprobs`, and its log-prob under the plain student
at temperature 1 as `student_logprobs` (the same numbers when temperature = 1 and
top_p = 1, else one extra prefill pass). A LoRA student serves adapter versions through
vLLM's LoRA support: the base weights load once, each update ships only the adapter.
Shapes: B rows, P prompt tokens, T response tokens.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from protege.actors.sampler import _step_seed, dataset_fields, rollout_batch
from protege.actors.vllm_engine import (
    lora_request,
    make_engine,
    outputs_from_scores,
    remove_dir,
    sampling_params,
    score_sequences,
    token_prompts,
    write_adapter,
)
from protege.capabilities import (
    FULL_UPDATE_TO_LORA_SAMPLER,
    LORA_UPDATE_TO_FULL_SAMPLER,
    SELF_TEACHER_NEEDS_LORA,
    cannot_run,
    sampler_problem,
    stale_update,
    teacher_problem,
)
from protege.config import SELF_TEACHER, LoraConfig, RolloutConfig
from protege.modeling import load_tokenizer, resolve_path
from protege.privileged import scored_on_view
from protege.records import PromptBatch, RolloutBatch, RolloutPlan, WeightUpdate
from protege.teacher_payload import attach_outputs


class VLLMSampler:
    """Samples responses with an in-process vLLM engine holding the student."""

    def __init__(
        self,
        student_model: str,
        rollout: RolloutConfig,
        teacher_model: str | None = None,
        dtype: str = "float32",
        seed: int = 0,
        lora: LoraConfig | None = None,
    ) -> None:
        self.rollout = rollout
        self.seed = seed
        self.lora = lora if lora is not None and lora.enabled else None
        self.teacher_model = teacher_model  # only "self" is usable here (score_as_teacher)
        self.tokenizer = load_tokenizer(student_model)
        self.llm = make_engine(
            student_model,
            dtype,
            seed,
            lora=self.lora,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
            weight_sync=rollout.weight_sync,
        )
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.eos_ids = _eos_ids(self.tokenizer, student_model)
        self._version = 0
        self._adapter_root = Path(tempfile.mkdtemp(prefix="protege-lora-"))
        self._adapter: tuple[int, str] | None = None  # (vLLM LoRA id, directory) being served

    @property
    def version(self) -> int:
        return self._version

    def weights_version(self) -> int:
        """`version` as a call (actors answer calls, not properties): the pipeline checks it
        to catch a sampler that Ray restarted with the initial student's weights."""
        return self._version

    @staticmethod
    def supports(plan: RolloutPlan) -> str | None:
        """None when vLLM can run `plan`, else why not (naming the HF backend)."""
        return sampler_problem("vllm", plan)

    # -- sampling ------------------------------------------------------------------------
    def generate(self, prompts: PromptBatch, plan: RolloutPlan) -> RolloutBatch:
        started = time.perf_counter()
        reason = self.supports(plan)
        if reason is not None:
            raise ValueError(cannot_run("rollout", "vllm", reason))
        n = plan.samples_per_prompt
        prompt_ids = prompts.prompt_ids.repeat_interleave(n, dim=0)
        prompt_mask = prompts.prompt_mask.bool().repeat_interleave(n, dim=0)
        if plan.source == "dataset":
            fields = self._dataset_responses(prompts, prompt_ids, prompt_mask, n)
        else:
            fields = self._sample(prompts, n, prompt_ids, prompt_mask)
        extras = fields.pop("extras")
        return rollout_batch(
            prompts, n, prompt_ids, prompt_mask, fields, extras, self._version, started
        )

    def greedy_texts(self, prompts: PromptBatch, max_new_tokens: int) -> list[str]:
        """The current student's greedy responses as text, up to EOS, special tokens dropped."""
        params = sampling_params(
            temperature=0.0,
            max_tokens=max_new_tokens,
            stop_token_ids=self.eos_ids,
            detokenize=False,
        )
        outputs = self._run(prompts.prompt_ids, prompts.prompt_mask, params)
        ids = [list(o.outputs[0].token_ids) for o in outputs]
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def _sample(
        self, prompts: PromptBatch, n: int, prompt_ids: Tensor, prompt_mask: Tensor
    ) -> dict:
        params = sampling_params(
            n=n,
            temperature=self.rollout.temperature,
            top_p=self.rollout.top_p,
            max_tokens=self.rollout.max_new_tokens,
            stop_token_ids=self.eos_ids,
            logprobs=0,  # the sampled token's log-prob only
            flat_logprobs=True,  # plain lists, not one dict per token
            detokenize=False,
        )
        # Seeded by (seed, step, row), not by history: a resumed run samples what the
        # uninterrupted one did. vLLM seeds the k-th of n samples with seed + k, so rows'
        # seeds are n apart and no two samples of a step share a random stream.
        base = _step_seed(self.seed, prompts.step) % (1 << 30)
        per_row = [params.clone() for _ in range(prompts.size)]
        for row, row_params in enumerate(per_row):
            row_params.seed = base + row * n
        outputs = self._run(prompts.prompt_ids, prompts.prompt_mask, per_row)
        samples = [c for o in outputs for c in sorted(o.outputs, key=lambda c: c.index)]
        width = max(len(c.token_ids) for c in samples)
        shape = (len(samples), width)
        response_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        behaviour = torch.zeros(shape)
        for row, sample in enumerate(samples):
            length = len(sample.token_ids)
            response_ids[row, :length] = torch.tensor(sample.token_ids)
            behaviour[row, :length] = torch.tensor(
                [sample.logprobs.logprobs[sample.logprobs.start_indices[t]] for t in range(length)]
            )
        lengths = torch.tensor([len(c.token_ids) for c in samples])
        mask = torch.arange(width)[None] < lengths[:, None]
        batch = RolloutBatch(prompt_ids, prompt_mask, response_ids, mask)
        plain = self.rollout.temperature == 1.0 and self.rollout.top_p == 1.0
        student = (
            behaviour if plain else score_sequences(self.llm, batch, 0, self._lora())["sampled"]
        )
        truncated = [c.finish_reason == "length" for c in samples]
        return {
            "response_ids": response_ids,
            "response_mask": mask,
            "token_source": torch.zeros(shape, dtype=torch.int8),
            "behaviour_logprobs": torch.where(mask, behaviour, 0.0),
            "student_logprobs": torch.where(mask, student, 0.0),
            "extras": {"rollout/truncated_fraction": sum(truncated) / max(len(truncated), 1)},
        }

    def _dataset_responses(
        self, prompts: PromptBatch, prompt_ids: Tensor, prompt_mask: Tensor, n: int
    ) -> dict:
        def score(forced: RolloutBatch) -> Tensor:
            return score_sequences(self.llm, forced, 0, self._lora())["sampled"]

        return dataset_fields(prompts, prompt_ids, prompt_mask, n, self.pad_id, score)

    def _run(self, ids: Tensor, mask: Tensor, params) -> list:
        requests = token_prompts(ids, mask)
        return self.llm.generate(requests, params, lora_request=self._lora(), use_tqdm=False)

    # -- LoRA self-distillation: the same engine with no adapter is the teacher ----------
    def score_as_teacher(self, batch: RolloutBatch, plan: RolloutPlan) -> RolloutBatch:
        """Teacher outputs from the student's base model: this engine with no adapter
        (teacher.model='self' with teacher.backend='vllm'); no second model in memory."""
        if self.lora is None or self.teacher_model not in (None, SELF_TEACHER):
            raise ValueError(SELF_TEACHER_NEEDS_LORA)
        reason = teacher_problem("vllm", plan)
        if reason is not None:
            raise ValueError(cannot_run("teacher", "vllm", reason))
        if plan.teacher_need == "none":
            return batch
        topk = plan.topk if plan.teacher_need == "topk" else 0

        def score(view: RolloutBatch) -> RolloutBatch:  # a privileged prompt, or the student's
            fields = outputs_from_scores(score_sequences(self.llm, view, topk), view, plan)
            return attach_outputs(view, fields, plan.store_as)

        return scored_on_view(batch, plan, score)

    # -- weights -------------------------------------------------------------------------
    def load_weights(self, update: WeightUpdate) -> None:
        """Take the learner's weights: the full state dict loaded in place (no restart), or
        with LoRA a new adapter version (the base weights never travel again)."""
        if update.version < self._version:
            raise ValueError(stale_update(update.version, self._version))
        if update.lora_only:
            self._load_adapter(update)
        elif self.lora is not None:
            raise ValueError(FULL_UPDATE_TO_LORA_SAMPLER)
        else:
            # vLLM's in-place reload: checkpoint-format (HF) names, layerwise processing.
            weights = list(update.tensors.items())
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
            )
            self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        self._version = update.version

    def _load_adapter(self, update: WeightUpdate) -> None:
        if self.lora is None:
            raise ValueError(LORA_UPDATE_TO_FULL_SAMPLER)
        previous = self._adapter
        lora_id = (previous[0] + 1) if previous else 1  # a new id per version: no stale cache
        directory = self._adapter_root / f"v{update.version}-{lora_id}"
        path = write_adapter(update.tensors, self.lora, directory)
        self.llm.llm_engine.add_lora(lora_request(lora_id, path))
        self._adapter = (lora_id, path)
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous[0])
            remove_dir(previous[1])

    def _lora(self):
        if self._adapter is None:
            return None  # version 0: peft starts with B = 0, so the adapter is the identity
        return lora_request(*self._adapter)

    # -- GPU weight broadcast (NCCL): called by the learner's rank 0 through the actor ---
    # These mirror vLLM's weight-sync client protocol (vllm.distributed.weight_transfer),
    # so `protege.actors.vllm_weight_sync` can drive them from the learner.
    def weight_receivers(self) -> int:
        """GPU workers of this engine that join the broadcast group."""
        return int(self.llm.get_world_size(include_dp=True))

    def init_weight_transfer_engine(self, request) -> None:
        self.llm.init_weight_transfer_engine(request)

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, request) -> None:
        self.llm.update_weights(request)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()
        if weight_version is not None:
            self._version = int(weight_version)

    def update_weight_version(self, weight_version: str) -> None:
        self._version = int(weight_version)

    def __del__(self) -> None:
        root = getattr(self, "_adapter_root", None)
        if root is not None and remove_dir is not None:  # None at interpreter exit
            remove_dir(root)


def _eos_ids(tokenizer, model: str) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config lists (chat models often
    stop on several)."""
    from transformers import GenerationConfig

    ids = {int(tokenizer.eos_token_id)}
    try:
        extra = GenerationConfig.from_pretrained(resolve_path(model)).eos_token_id
    except OSError:  # no generation_config.json
        extra = None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra is not None:
        ids.update(int(i) for i in extra)
    return sorted(ids)
