"""The serving worker: speculative decoding of requests with a draft that can be reloaded.

The draft lives in an `HFSampler` (the training pipeline's sampler) so new draft weights
arrive through its `load_weights(WeightUpdate)`, the same path a learner's weights take
to the rollout samplers; the target is a frozen HF model. A Ray actor wraps this class
(`protege.osd.loop` spawns it through the launcher); tests build it directly.
Shapes: L prefix tokens, T response tokens, S stored support, V vocab.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from protege.actors.sampler import HFSampler
from protege.algorithms.divergences import kl_from_logprobs, log_probs, topk_buckets
from protege.config import RolloutConfig
from protege.modeling import check_same_vocabulary, load_model, load_tokenizer
from protege.osd.config import OSDConfig
from protege.osd.decoder import Decoded, SpeculativeDecoder
from protege.osd.records import DistillRecords, Request, Served
from protege.records import WeightUpdate


class OSDServer:
    """Serves one request at a time; keeps (prefix, draft, target) records per config."""

    def __init__(self, config: OSDConfig):
        self.config = config
        rollout = RolloutConfig(max_new_tokens=config.serving.max_new_tokens)
        self.sampler = HFSampler(
            config.draft.model, rollout, dtype=config.draft.dtype, seed=config.serving.seed
        )
        self.tokenizer = self.sampler.tokenizer
        check_same_vocabulary(self.tokenizer, load_tokenizer(config.target.model))
        self.target = load_model(config.target.model, config.target.dtype).eval()
        self.target.requires_grad_(False)
        eos = self.sampler.eos_ids.tolist()
        self.decoder = SpeculativeDecoder(
            self.sampler.model, self.target, eos, config.serving.temperature
        )
        self.generator = torch.Generator()
        self._heldout: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def version(self) -> int:
        """Learner version of the draft weights being served (0: the initial draft)."""
        return self.sampler.version

    def serve(self, request: Request) -> Served:
        started = time.perf_counter()
        prompt = self.encode(request.prompt)
        self.generator.manual_seed(self.config.serving.seed * 1_000_003 + request.index)
        serving = self.config.serving
        decoded = self.decoder.generate(prompt, serving.max_new_tokens, serving.k, self.generator)
        records = self._records(prompt, decoded) if serving.k > 0 else None
        return Served(
            index=request.index,
            text=self.tokenizer.decode(decoded.response_ids, skip_special_tokens=True),
            tokens=int(decoded.response_ids.numel()),
            verified=decoded.num_verified,
            accepted=decoded.num_accepted,
            drafted=decoded.draft_forwards,
            rounds=decoded.rounds,
            seconds=time.perf_counter() - started,
            weights_version=self.version,
            records=records,
        )

    def load_weights(self, update: WeightUpdate) -> float:
        """Take new draft weights between two requests; returns the seconds it took."""
        started = time.perf_counter()
        self.sampler.load_weights(update)
        return time.perf_counter() - started

    def encode(self, prompt: str) -> Tensor:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    # -- buffer records -------------------------------------------------------------------
    def _records(self, prompt: Tensor, decoded: Decoded) -> DistillRecords | None:
        """The positions the buffer keeps (rejected proposals, or every verified one), with
        both distributions at the distillation temperature on the payload's support."""
        keep = decoded.rejected if self.config.buffer.positions == "rejected" else decoded.verified
        positions = keep.nonzero().squeeze(-1)
        if positions.numel() == 0:
            return None
        temperature = self.config.distill.temperature
        draft = log_probs(decoded.draft_logprobs[positions], temperature)
        target = log_probs(decoded.target_logprobs[positions], temperature)
        support = None
        if self.config.buffer.payload == "topk":
            k = min(self.config.buffer.topk, target.shape[-1])
            top_logp, support = target.topk(k, dim=-1)
            draft, target = topk_buckets(draft, support, top_logp)
        prefix_ids, prefix_mask = _prefixes(prompt, decoded.response_ids, positions)
        return DistillRecords(
            prefix_ids=prefix_ids,
            prefix_mask=prefix_mask,
            token_ids=decoded.response_ids[positions],
            draft_logprobs=draft,
            target_logprobs=target,
            rejected=decoded.rejected[positions],
            support_ids=support,
            weights_version=self.version,
        )

    # -- held-out divergence --------------------------------------------------------------
    def prepare_heldout(self, prompts: list[str]) -> int:
        """Fix the held-out prefixes: the target's greedy responses to `prompts` (never
        served), teacher-forced. Returns the number of response positions."""
        plain = SpeculativeDecoder(self.target, self.target, self.decoder.eos_ids, 0.0)
        rows = []
        for prompt in prompts:
            ids = self.encode(prompt)
            response = plain.generate(ids, self.config.serving.max_new_tokens, k=0).response_ids
            rows.append((ids, response))
        self._heldout = _teacher_forced(rows, int(self.tokenizer.pad_token_id))
        return int(self._heldout[2].sum())

    @torch.inference_mode()
    def heldout_kl(self) -> float:
        """KL(p_target ‖ q_draft) at temperature 1, averaged over the held-out response
        positions: how far the draft is from the target off the served traffic."""
        if self._heldout is None:
            raise ValueError("heldout_kl needs prepare_heldout(prompts) first")
        ids, attention, predicts = self._heldout
        target = torch.log_softmax(self.target(input_ids=ids, attention_mask=attention).logits, -1)
        draft = torch.log_softmax(
            self.sampler.model(input_ids=ids, attention_mask=attention).logits, -1
        )
        kl = kl_from_logprobs(target, draft)
        return float(kl[predicts].mean())


def _prefixes(prompt: Tensor, response: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ⧺ response[:t] for each position t. -> [N,L] ids, [N,L] mask."""
    sequence = torch.cat([prompt, response])
    width = prompt.numel() + int(positions.max())
    ids = torch.zeros(positions.numel(), width, dtype=torch.long)
    mask = torch.zeros(positions.numel(), width, dtype=torch.bool)
    for row, t in enumerate(positions.tolist()):
        length = prompt.numel() + t
        ids[row, width - length :] = sequence[:length]
        mask[row, width - length :] = True
    return ids, mask


def _teacher_forced(
    rows: list[tuple[Tensor, Tensor]], pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded prompt ⧺ response sequences [B,L], their attention mask [B,L], and the
    positions whose logits predict a response token [B,L] (bool)."""
    width = max(p.numel() + r.numel() for p, r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    predicts = torch.zeros(len(rows), width, dtype=torch.bool)
    for row, (prompt, response) in enumerate(rows):
        n, m = prompt.numel(), response.numel()
        ids[row, : n + m] = torch.cat([prompt, response])
        attention[row, : n + m] = 1
        predicts[row, n - 1 : n + m - 1] = True
    return ids, attention, predicts
