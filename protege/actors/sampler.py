"""Rollout sampling on the HF backend (CPU, or one GPU without vLLM).

One token-by-token loop with a KV cache covers every way a plan can ask responses to be
written: student sampling, teacher-written responses (SeqKD), teacher-mixed sampling
(MiniLLM) and gated teacher rewrite (gated dual-KL). Each token keeps its log-prob under
the distribution that actually drew it (`behaviour_logprobs`) and under the plain student
at temperature 1 (`student_logprobs`, the policy the learner trains).
Shapes: B rows, P prompt tokens, T response tokens, V vocab.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from protege.actors.decoding import Choice, Decoder, TokenChooser, teacher_mode
from protege.capabilities import (
    FULL_UPDATE_TO_LORA_SAMPLER,
    LORA_UPDATE_TO_FULL_SAMPLER,
    SELF_TEACHER_NEEDS_LORA,
    cannot_run,
    sampler_problem,
    stale_update,
)
from protege.config import SELF_TEACHER, LoraConfig, RolloutConfig
from protege.lora import wrap_with_lora
from protege.memory import peak_metrics
from protege.modeling import (
    check_same_vocabulary,
    load_frozen_model,
    load_model,
    load_tokenizer,
    response_logits,
)
from protege.onednn_head import fast_output_head
from protege.records import PromptBatch, RolloutBatch, RolloutPlan, TokenSource, WeightUpdate

Replica = tuple[torch.nn.Module, Callable | None]  # (model, context factory switching LoRA off)


class HFSampler:
    """Samples responses with HF models; holds the student (LoRA-wrapped when `lora` is
    enabled) and, when a plan needs one while decoding, a teacher replica (loaded at first
    use)."""

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
        self.dtype = dtype
        self.tokenizer = load_tokenizer(student_model)
        self.student = fast_output_head(
            load_model(student_model, dtype).eval().requires_grad_(False)
        )
        # peft injects the adapter into `student` in place; its forward then uses it (B = 0:
        # the identity until the first update). Adapter tensors load through `peft_model`.
        lora_on = lora is not None and lora.enabled
        self.peft_model = wrap_with_lora(self.student, lora, seed).eval() if lora_on else None
        self.teacher_model = teacher_model
        self._teacher: Replica | None = None
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.eos_ids = torch.tensor(_eos_ids(self.tokenizer, self.student), device=self.device)
        self.seed = seed
        self.generator = torch.Generator(device=self.device)
        self._version = 0

    @property
    def version(self) -> int:
        """Learner version of the weights the sampler holds (0: the initial student)."""
        return self._version

    def weights_version(self) -> int:
        """`version` as a call (actors answer calls, not properties): the pipeline checks it
        to catch a sampler that Ray restarted with the initial student's weights."""
        return self._version

    @property
    def model(self) -> torch.nn.Module:
        """The student module the sampler decodes with (LoRA layers injected when enabled)."""
        return self.student

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    @staticmethod
    def supports(plan: RolloutPlan) -> str | None:
        """None when this backend can run `plan`, else why not."""
        return sampler_problem("hf", plan)

    def generate(self, prompts: PromptBatch, plan: RolloutPlan) -> RolloutBatch:
        """Responses to `prompts` (each repeated `plan.samples_per_prompt` times), written
        as the plan says, with their behaviour and student log-probs."""
        started = time.perf_counter()
        reason = self.supports(plan)
        if reason is not None:
            raise ValueError(cannot_run("rollout", "hf", reason))
        # Seeded by (seed, step), not by history: a resumed run samples what the
        # uninterrupted one did, with no sampler state in the checkpoint.
        self.generator.manual_seed(_step_seed(self.seed, prompts.step))
        n = plan.samples_per_prompt
        prompt_ids = prompts.prompt_ids.repeat_interleave(n, dim=0)
        prompt_mask = prompts.prompt_mask.bool().repeat_interleave(n, dim=0)
        with torch.inference_mode():
            if plan.source == "dataset":
                fields = self._dataset_responses(prompts, prompt_ids, prompt_mask, n)
            else:
                ids, mask = prompt_ids.to(self.device), prompt_mask.to(self.device)
                fields = self._decode(ids, mask, plan, self.rollout.max_new_tokens)
        extras = fields.pop("extras")
        # Cloned outside inference mode: an in-process learner may differentiate through them.
        fields = {name: value.cpu().clone() for name, value in fields.items()}
        return rollout_batch(
            prompts, n, prompt_ids, prompt_mask, fields, extras, self._version, started
        )

    def greedy_texts(self, prompts: PromptBatch, max_new_tokens: int) -> list[str]:
        """The current student's greedy responses as text, up to EOS with special tokens
        dropped (evaluation). Draws no random numbers, so sampling streams are unaffected."""
        plan = RolloutPlan(teacher_need="none")
        with torch.inference_mode():
            ids, mask = (
                prompts.prompt_ids.to(self.device),
                prompts.prompt_mask.bool().to(self.device),
            )
            fields = self._decode(ids, mask, plan, max_new_tokens, greedy=True)
        ids = torch.where(fields["response_mask"], fields["response_ids"], self.pad_id)
        return self.tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True)

    def load_weights(self, update: WeightUpdate) -> None:
        """Take the learner's weights: the full state dict, or the LoRA adapter only."""
        if update.version < self._version:
            raise ValueError(stale_update(update.version, self._version))
        if update.lora_only:
            self._load_adapter(update.tensors)
        elif self.peft_model is not None:
            raise ValueError(FULL_UPDATE_TO_LORA_SAMPLER)
        else:
            self.student.load_state_dict(update.tensors, strict=True)
        self._version = update.version

    def _load_adapter(self, tensors: dict[str, Tensor]) -> None:
        from peft import set_peft_model_state_dict

        if self.peft_model is None:
            raise ValueError(LORA_UPDATE_TO_FULL_SAMPLER)
        result = set_peft_model_state_dict(self.peft_model, tensors)
        missing = [key for key in result.missing_keys if "lora_" in key]
        if result.unexpected_keys or missing:
            raise ValueError(
                "LoRA update does not match the sampler's adapter: "
                f"unexpected {sorted(result.unexpected_keys)[:4]}, missing {sorted(missing)[:4]} "
                "(student.lora must be the same on learner and sampler)"
            )

    # -- decoding -----------------------------------------------------------------------

    def _decode(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        plan: RolloutPlan,
        max_new_tokens: int,
        greedy: bool = False,
    ) -> dict:
        """The token-by-token loop, one forward per model per token. Every row emits at
        least one token; a row is done at its first EOS (pad ids follow); the loop ends when
        all rows are done or after `max_new_tokens`."""
        teacher = self._teacher_for(plan)
        student = Decoder(self.student) if plan.source == "student" else None
        chooser = TokenChooser(plan, self.rollout, self.generator, greedy)
        attention = prompt_mask.long()
        positions = (attention.cumsum(-1) - 1).clamp_min(0)  # left padding: count real tokens
        next_position = attention.sum(-1, keepdim=True)
        inputs = prompt_ids
        done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
        columns: list[Choice] = []
        masks: list[Tensor] = []
        for _ in range(max_new_tokens):
            student_logits = student.next_logits(inputs, attention, positions) if student else None
            teacher_logits = teacher.next_logits(inputs, attention, positions) if teacher else None
            choice = chooser.choose(student_logits, teacher_logits, active=~done)
            token = torch.where(done, self.pad_id, choice.token)
            columns.append(replace(choice, token=token))
            masks.append(~done)
            done = done | torch.isin(token, self.eos_ids)
            if bool(done.all()):
                break
            inputs = token.unsqueeze(-1)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            positions, next_position = next_position, next_position + 1
        mask = torch.stack(masks, dim=1)
        response_ids = torch.stack([c.token for c in columns], dim=1)
        if student is not None:
            student_logprobs = torch.stack([c.student for c in columns], dim=1)
        else:  # the teacher wrote: one teacher-forced student forward, not T incremental ones
            forced = RolloutBatch(prompt_ids, prompt_mask, response_ids, mask)
            student_logprobs = self._forced_student_logprobs(forced)
        fields = {
            "response_ids": response_ids,
            "response_mask": mask,
            "token_source": torch.stack([c.source for c in columns], dim=1).to(torch.int8),
            "behaviour_logprobs": torch.stack([c.behaviour for c in columns], dim=1),
            "student_logprobs": student_logprobs,
        }
        for name in ("token_source", "behaviour_logprobs", "student_logprobs"):
            fields[name] = torch.where(mask, fields[name], torch.zeros_like(fields[name]))
        fields["extras"] = chooser.extras(mask, done, fields["token_source"])
        # Seconds inside model forwards; the rest of `rollout/seconds` is the sampler's own work.
        fields["extras"]["rollout/model_seconds"] = sum(d.seconds for d in (student, teacher) if d)
        return fields

    def _forced_student_logprobs(self, batch: RolloutBatch) -> Tensor:
        """log q_θ(y_t) [B,T] at temperature 1 from one teacher-forced forward."""
        logp = torch.log_softmax(response_logits(self.student, batch).float(), dim=-1)
        return logp.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)

    def _dataset_responses(
        self, prompts: PromptBatch, prompt_ids: Tensor, prompt_mask: Tensor, n: int
    ) -> dict:
        def score(forced: RolloutBatch) -> Tensor:
            return self._forced_student_logprobs(forced).cpu()

        return dataset_fields(prompts, prompt_ids, prompt_mask, n, self.pad_id, score)

    def _teacher_for(self, plan: RolloutPlan) -> Decoder | None:
        """A fresh incremental decoder over the teacher replica, or None when the plan does
        not need the teacher while decoding."""
        mode = teacher_mode(plan)
        if mode is None:
            return None
        if self.teacher_model is None:
            raise ValueError(
                f"{mode} needs a teacher replica in the rollout sampler, but no teacher model was "
                "given; set teacher.model"
            )
        if self._teacher is None:  # loaded at first use: most plans never need it here
            self._teacher = self._load_teacher(self.teacher_model)
        return Decoder(*self._teacher)

    def share_teacher(self, model: torch.nn.Module) -> None:
        """Decode with `model` as the teacher replica: a colocated scorer's frozen copy
        (protege.actors.colocated), so the process holds the teacher once, in its dtype."""
        self._teacher = (model, None)

    def _load_teacher(self, name: str) -> Replica:
        if name == SELF_TEACHER:
            if self.peft_model is None:
                raise ValueError(SELF_TEACHER_NEEDS_LORA)
            return self.student, self.peft_model.disable_adapter
        check_same_vocabulary(self.tokenizer, load_tokenizer(name))
        return load_frozen_model(name, self.dtype, self.device), None


def rollout_batch(
    prompts: PromptBatch,
    n: int,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    fields: dict[str, Tensor],
    extras: dict[str, float],
    version: int,
    started: float,
) -> RolloutBatch:
    """A sampler's answer to `generate`: the response `fields` for `prompts` repeated `n`
    times (`prompt_ids`/`prompt_mask`, grouped per prompt), with length, token and time extras."""
    lengths = fields["response_mask"].sum(-1).float()
    extras["rollout/response_length"] = float(lengths.mean()) if len(lengths) else 0.0
    extras["rollout/tokens"] = float(lengths.sum())
    extras["rollout/seconds"] = time.perf_counter() - started
    extras.update(peak_metrics("rollout"))
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        group_ids=torch.arange(prompts.size).repeat_interleave(n),
        answers=tuple(a for a in prompts.answers for _ in range(n)),
        step=prompts.step,
        weights_version=version,
        extras=extras,
        teacher_prompts=prompts.teacher_prompts and prompts.teacher_prompts.repeat(n),
        **fields,
    )


def dataset_fields(
    prompts: PromptBatch,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    n: int,
    pad_id: int,
    score: Callable[[RolloutBatch], Tensor],
) -> dict:
    """GKD's off-policy branch: the dataset's completions, with the student's log-probs of
    them from `score` (per token, [B,T]). Nothing sampled them: no behaviour log-probs."""
    if prompts.completion_ids is None or prompts.completion_mask is None:
        raise ValueError(
            "plan source='dataset' needs prompts with completions (a 'completion' column)"
        )
    mask = prompts.completion_mask.bool().repeat_interleave(n, dim=0)
    ids = torch.where(mask, prompts.completion_ids.repeat_interleave(n, dim=0), pad_id)
    student_logprobs = score(RolloutBatch(prompt_ids, prompt_mask, ids, mask))
    return {
        "response_ids": ids,
        "response_mask": mask,
        "token_source": torch.full(ids.shape, int(TokenSource.DATASET), dtype=torch.int8),
        "student_logprobs": torch.where(mask, student_logprobs, 0.0),
        "extras": {},
    }


def _step_seed(seed: int, step: int) -> int:
    """A generator seed for (seed, step), distinct for nearby pairs of either."""
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def _eos_ids(tokenizer, model: torch.nn.Module) -> list[int]:
    """The tokenizer's EOS plus any the model's generation config lists (chat models often
    stop on several, e.g. <|im_end|> and <|endoftext|>)."""
    ids = {int(tokenizer.eos_token_id)}
    generation = getattr(model, "generation_config", None)
    extra = getattr(generation, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra is not None:
        ids.update(int(i) for i in extra)
    return sorted(ids)
