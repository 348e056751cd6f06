"""The decoding policy: how each next token is chosen from the student's and/or the
teacher's next-token logits.

Student sampling (temperature, top_p), teacher-written responses (SeqKD), teacher-mixed
sampling (MiniLLM) and gated teacher rewrite (gated dual-KL) are all one `TokenChooser`;
`Decoder` runs one model token by token with its own KV cache. Each choice keeps the
token's log-prob under the distribution that drew it and under the plain student.
Shapes: B rows, V vocab.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from protege.algorithms.divergences import kl_from_logprobs, log_probs
from protege.config import RolloutConfig
from protege.records import RolloutPlan, TokenSource


def teacher_mode(plan: RolloutPlan) -> str | None:
    """The plan's decoding mode that needs the teacher, named for error messages."""
    if plan.source == "teacher":
        return "source='teacher' (teacher-written responses)"
    if plan.mix_alpha > 0:
        return f"teacher-mixed sampling (mix_alpha={plan.mix_alpha})"
    if plan.rewrite is not None:
        return "teacher rewrite (gated dual-KL)"
    return None


class Decoder:
    """One model decoding token by token with its own KV cache."""

    def __init__(self, model: torch.nn.Module, adapter_off: Callable | None = None) -> None:
        self.model = model
        self.adapter_off = adapter_off  # peft's disable_adapter, for the LoRA self-teacher
        self.cache = None
        self.seconds = 0.0  # wall seconds inside the model's forwards

    def next_logits(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor
    ) -> Tensor:
        """Feed the new tokens [B,n]; float32 logits of the next token [B,V]."""
        started = time.perf_counter()
        context = self.adapter_off() if self.adapter_off is not None else contextlib.nullcontext()
        with context:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.cache = out.past_key_values
        logits = out.logits[:, -1].float()
        self.seconds += time.perf_counter() - started
        return logits


@dataclass(frozen=True)
class Choice:
    """One step's token per row, with its log-probs and who wrote it."""

    token: Tensor  # [B] long
    behaviour: Tensor  # [B] log-prob under the distribution that drew the token
    student: Tensor  # [B] log q_θ(token) at temperature 1 (zeros when the student is not run)
    source: Tensor  # [B] TokenSource


class TokenChooser:
    """Picks each step's token from the student's and/or the teacher's next-token logits,
    as the plan says, and keeps the teacher-rewrite state and counts."""

    def __init__(
        self, plan: RolloutPlan, rollout: RolloutConfig, generator: torch.Generator, greedy: bool
    ) -> None:
        self.plan = plan
        self.temperature = rollout.temperature
        self.top_p = rollout.top_p
        self.generator = generator
        self.greedy = greedy
        self.step_start: Tensor | None = None  # [B] bool: the next token opens a step
        self.teacher_writing: Tensor | None = None  # [B] bool: the teacher writes this step
        self.steps: list[Tensor] = []  # per token: rows that decided a step there
        self.rewritten_steps: list[Tensor] = []  # ... and of those, rows the teacher took
        self.step_kl: list[Tensor] = []  # ... and D_t summed over the deciding rows

    def choose(
        self, student_logits: Tensor | None, teacher_logits: Tensor | None, active: Tensor
    ) -> Choice:
        if student_logits is None:  # source == "teacher": it samples as the student would
            draw = nucleus(log_probs(teacher_logits, self.temperature), self.top_p)
            token = self._draw(draw)
            zeros = torch.zeros_like(token, dtype=draw.dtype)
            return Choice(
                token, gather(draw, token), zeros, torch.full_like(token, TokenSource.TEACHER)
            )
        vocab = student_logits.shape[-1]
        if teacher_logits is not None:  # ids both models have (padded vocabularies may differ)
            vocab = min(vocab, teacher_logits.shape[-1])
            teacher_logits = teacher_logits[:, :vocab]
        draw = self._proposal(student_logits[:, :vocab], teacher_logits)
        token = self._draw(draw)
        behaviour = gather(draw, token)
        source = torch.full_like(token, TokenSource.STUDENT)
        if self.plan.rewrite is not None:
            token, behaviour, source = self._rewrite(
                student_logits[:, :vocab], teacher_logits, token, behaviour, source, active
            )
        student_logp = torch.log_softmax(student_logits, dim=-1)
        return Choice(token, behaviour, gather(student_logp, token), source)

    def _draw(self, logp: Tensor) -> Tensor:
        return logp.argmax(-1) if self.greedy else sample(logp, self.generator)

    def _proposal(self, student_logits: Tensor, teacher_logits: Tensor | None) -> Tensor:
        """Log-probs [B,V] of the sampling distribution: the tempered student, or MiniLLM's
        mixture p̃ = α·p_T + (1−α)·q_θ of the tempered pair; then the nucleus (top_p) cut."""
        student_logp = log_probs(student_logits, self.temperature)
        alpha = self.plan.mix_alpha
        if alpha == 0:
            return nucleus(student_logp, self.top_p)
        teacher_logp = log_probs(teacher_logits, self.temperature)
        mixture = torch.logaddexp(teacher_logp + _log(alpha), student_logp + _log(1.0 - alpha))
        return nucleus(mixture, self.top_p)

    def _rewrite(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        token: Tensor,
        behaviour: Tensor,
        source: Tensor,
        active: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Gated dual-KL rewrite: at the first token of a step, D_t = KL(q_θ‖p_T) at that
        position (at the plan's temperature, the one the loss's gate uses) decides whether
        the teacher writes the whole step, up to and including its delimiter."""
        spec = self.plan.rewrite
        if self.step_start is None:
            self.step_start = torch.ones_like(active)
            self.teacher_writing = torch.zeros_like(active)
        distance = kl_from_logprobs(
            log_probs(student_logits, self.plan.temperature),
            log_probs(teacher_logits, self.plan.temperature),
        )
        deciding = self.step_start & active
        self.teacher_writing = torch.where(
            self.step_start, distance >= spec.threshold, self.teacher_writing
        )
        self.steps.append(deciding.sum())
        self.rewritten_steps.append((deciding & self.teacher_writing).sum())
        self.step_kl.append(torch.where(deciding, distance, 0.0).sum())
        teacher_logp = torch.log_softmax(teacher_logits, dim=-1)
        if spec.mode == "argmax":
            teacher_token = teacher_logp.argmax(-1)
            teacher_behaviour = torch.zeros_like(behaviour)  # a deterministic choice: log 1
        else:
            draw = nucleus(teacher_logp, spec.top_p)
            teacher_token = self._draw(draw)
            teacher_behaviour = gather(draw, teacher_token)
        writing = self.teacher_writing
        token = torch.where(writing, teacher_token, token)
        behaviour = torch.where(writing, teacher_behaviour, behaviour)
        source = torch.where(writing, int(TokenSource.TEACHER), source)
        if spec.step_delimiter_id is not None:
            self.step_start = token == spec.step_delimiter_id
        return token, behaviour, source

    def extras(self, mask: Tensor, done: Tensor, token_source: Tensor) -> dict[str, float]:
        out = {"rollout/truncated_fraction": float((~done).float().mean()) if done.numel() else 0.0}
        if self.plan.rewrite is not None:
            steps = max(float(torch.stack(self.steps).sum()), 1.0)
            rewritten = float(torch.stack(self.rewritten_steps).sum())
            teacher_tokens = float(((token_source == TokenSource.TEACHER) & mask).sum())
            out["rollout/rewrite_fraction"] = teacher_tokens / max(float(mask.sum()), 1.0)
            out["rollout/rewritten_steps"] = rewritten
            out["rollout/rewrite_step_fraction"] = rewritten / steps
            out["rollout/step_kl"] = float(torch.stack(self.step_kl).sum()) / steps
        return out


def nucleus(logp: Tensor, top_p: float) -> Tensor:
    """Log-probs renormalised over the smallest set of most likely tokens whose mass
    reaches `top_p` (the most likely token is always kept); `logp` itself when top_p >= 1."""
    if top_p >= 1.0:
        return logp
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    probs = sorted_logp.exp()
    drop_sorted = probs.cumsum(-1) - probs >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    kept = logp.masked_fill(drop, -math.inf)
    return kept - kept.logsumexp(-1, keepdim=True)


def sample(logp: Tensor, generator: torch.Generator) -> Tensor:
    """One token per row from log-probs [B,V] (exponential race: argmax p/E with E ~ Exp(1)
    draws from p; zero-probability tokens are never drawn)."""
    noise = torch.empty_like(logp).exponential_(generator=generator).clamp_min_(1e-30)
    return (logp.exp() / noise).argmax(-1)


def gather(logp: Tensor, token: Tensor) -> Tensor:
    """logp[b, token[b]]: [B,V], [B] -> [B]."""
    return logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf
