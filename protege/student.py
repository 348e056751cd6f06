"""The student's forward as an algorithm's loss sees it: computed on demand, once per need.

`loss(student, batch)` receives a `StudentForward` over the batch's prompt ⧺ response
sequences. Reading `student.logits` runs one forward; `student.hidden`, `student.kv` and
`student.queries` come from the same forward when asked for first (`student.want(...)`),
else each triggers one more forward that also produces everything asked for before.
`student.forward_extra(ids, mask)` runs the student on another batch (pre-training text).
`student.per_token(fn, *payload)` evaluates a per-position function of the logits (a
divergence, log q(y)) a block of positions at a time, recomputed in the backward
(`protege.chunked`; `learner.loss_chunk_tokens`), so the loss keeps no
vocabulary-wide intermediates for the backward.
`student.modules` are the algorithm's trainable modules (projectors, routers), trained by
the same engine as the student.

Shapes: B rows, P prompt tokens (left-padded), T response tokens (right-padded),
S = P + T sequence positions, V vocab, d hidden size, H heads, D head_dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from protege.chunked import ChunkSetting, PerToken, chunk_tokens_for, per_token
from protege.modeling import sequence_inputs
from protege.records import RolloutBatch

OUTPUTS = frozenset({"logits", "hidden", "kv", "queries"})


class StudentForward:
    """Lazy view of the student's forward on one (micro-)batch."""

    def __init__(
        self,
        module: nn.Module,
        batch: RolloutBatch,
        modules: Mapping[str, nn.Module] | None = None,
        config: Any = None,
        chunk_tokens: ChunkSetting = "auto",
    ):
        self._module, self._batch, self._config = module, batch, config
        self.chunk_tokens = chunk_tokens  # positions per block of `per_token` (0: one block)
        self._modules = modules if modules is not None else nn.ModuleDict()
        self._wanted: set[str] = set()
        self._out: dict[str, Any] = {}
        self.forwards = 0  # forwards run so far (tests and accounting read it)

    def want(self, *names: str) -> StudentForward:
        """Declare outputs the loss will read, so one forward produces them all."""
        unknown = set(names) - OUTPUTS
        if unknown:
            raise ValueError(f"unknown student outputs {sorted(unknown)}; known: {sorted(OUTPUTS)}")
        self._wanted.update(names)
        return self

    @property
    def batch(self) -> RolloutBatch:
        return self._batch

    @property
    def modules(self) -> Mapping[str, nn.Module]:
        """The algorithm's trainable modules, by name (empty when it declares none)."""
        return self._modules

    @property
    def config(self) -> Any:
        """The student's HF config (layer, head and RoPE shapes for KV losses)."""
        return self._config

    @property
    def logits(self) -> Tensor:
        """[B,T,V]: position t predicts `batch.response_ids[:, t]`."""
        width = self._batch.response_ids.shape[1]
        return self._get("logits")[:, -(width + 1) : -1]

    def per_token(self, fn: PerToken, *payload: Tensor | None) -> Any:
        """fn(self.logits, *payload) -> [B,T] tensor(s), evaluated a block of positions at
        a time (`protege.chunked`): each payload is [B,T,...] over the response
        positions (teacher outputs, token ids), fn treats positions independently."""
        return _per_token(fn, self.logits, payload, self.chunk_tokens)

    @property
    def sequence_mask(self) -> Tensor:
        """[B,S] bool, True on real (non-padding) prompt and response tokens."""
        return torch.cat([self._batch.prompt_mask, self._batch.response_mask], dim=1).bool()

    @property
    def hidden(self) -> Tensor:
        """[B,S,d] last hidden state at every position."""
        return self._get("hidden")

    @property
    def kv(self):
        """Per-layer post-RoPE keys and values, `protege.kv.extract.LayerKV` of
        L × [B,H_kv,S,D], with gradients."""
        return self._get("kv")

    @property
    def queries(self) -> tuple[Tensor, ...]:
        """Per-layer post-RoPE queries, L × [B,H_q,S,D] (Llama/Qwen-style attention)."""
        return self._get("queries")

    def forward_extra(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits [N,L,V] of the student on another right-padded batch (e.g. pre-training
        text), positions counted over real tokens."""
        device = _device(self._module)
        attention = attention_mask.long()
        positions = (attention.cumsum(-1) - 1).clamp_min(0)
        self.forwards += 1
        return self._module(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            position_ids=positions.to(device),
            use_cache=False,
        ).logits

    def _get(self, name: str) -> Any:
        if name not in self._out:
            self._run({name, *self._wanted, *self._out})
        return self._out[name]

    def _run(self, names: set[str]) -> None:
        input_ids, attention_mask, positions = sequence_inputs(self._batch)
        self.forwards += 1
        if names & {"kv", "queries"}:
            self._out = self._run_with_cache(input_ids, attention_mask, positions, names)
            return
        device = _device(self._module)
        out = self._module(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=positions.to(device),
            use_cache=False,
            output_hidden_states="hidden" in names,
            # Only the positions that predict response tokens: no [B,P,V] logits of the prompt.
            logits_to_keep=self._batch.response_ids.shape[1] + 1,
        )
        self._out = {"logits": out.logits}
        if "hidden" in names:
            self._out["hidden"] = out.hidden_states[-1]

    def _run_with_cache(
        self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor, names: set[str]
    ) -> dict[str, Any]:
        from protege.kv.extract import KVSpec, forward_sequences

        if self._config is None:
            raise ValueError("student.kv / student.queries need the student's config")
        spec = KVSpec.from_config(self._config)
        out = forward_sequences(
            self._module, input_ids, attention_mask, positions, spec, "queries" in names
        )
        return {"logits": out.logits, "hidden": out.hidden, "kv": out.kv, "queries": out.queries}


def _per_token(fn: PerToken, logits: Tensor, payload: tuple, setting: ChunkSetting) -> Any:
    chunk_tokens = chunk_tokens_for(setting, logits.shape[-1])
    return per_token(fn, (logits, *payload), chunk_tokens)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class StudentLogits:
    """A student view over response logits computed elsewhere (tests, scoring saved
    outputs): only `logits` is available."""

    def __init__(
        self,
        logits: Tensor,
        modules: Mapping[str, nn.Module] | None = None,
        chunk_tokens: ChunkSetting = "auto",
    ):
        self.logits = logits
        self.modules = modules if modules is not None else nn.ModuleDict()
        self.chunk_tokens = chunk_tokens

    def per_token(self, fn: PerToken, *payload: Tensor | None) -> Any:
        """As `StudentForward.per_token`."""
        return _per_token(fn, self.logits, payload, self.chunk_tokens)

    def want(self, *names: str) -> StudentLogits:
        return self
