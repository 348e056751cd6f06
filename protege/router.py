"""The learned router of `fusion.mode: learned`: per row, α over the teachers, trained on the
mixture-of-experts likelihood of the rewarded responses (issue 14).

Why this signal. Trained on the distillation loss, a router would pick whichever teacher is
already closest to the student, not the one that is right. Instead each teacher i is an
expert whose likelihood of row b's sampled response is ℓ_bi = Σ_t log p_i(y_bt) (every
payload kind carries log p_i of the sampled tokens), and the router is the gate of a mixture
of experts (Jacobs, Jordan, Nowlan & Hinton 1991, "Adaptive mixtures of local experts")
fitted to the responses the reward says are good:

    L = −Σ_b w_b log Σ_i α_bi exp(ℓ_bi) / Σ_b w_b,   w_b = clip(reward_b, 0, 1),

whose gradient in the router's logits is w_b (α_b − r_b) with r_bi ∝ α_bi exp(ℓ_bi) the
posterior responsibility: α moves toward the teacher that best explains the good answers.
Rows of weight 0 give no signal; a step with no rewarded row leaves the router untouched.

Against collapse, a load-balancing term (as MoE routers have; here the entropy of the
batch's mean α, the marginal-entropy term of Krause, Perona & Gomes 2010) is subtracted:
L − balance·H(ᾱ). Without it the router and the student feed each other: the rows the
student already answers (on the tiny task: the easier sums below 100) are the only ones
rewarded, so α drifts to their teacher for every row, the student then learns only that
teacher's half, and no other row is ever rewarded again. H(ᾱ) is maximal for any split of
the rows, so it does not soften a router that sends each row to one teacher; it only keeps
the batch from going to one teacher before the evidence says which rows are whose.

The router reads the student's own last hidden states over the prompt (its mean and its
last position, which already attends to the whole prompt), under no gradient: the prompt is
what says which specialist is right, and the router must not reshape the student. Its MLP
is the KV fusion's `LearnableRouter` (zero-initialised last layer: α starts at the prior,
the normalised `teachers.N.weight`). It has its own Adam optimizer and learning rate, and
one update per learner step from the gradient summed over micro-batches and data-parallel
ranks; its state is saved as safetensors next to the learner's checkpoint.

Shapes: n teachers, B rows, P prompt tokens (left-padded), T response tokens, d hidden size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from protege.errors import ProtegeError
from protege.fusion_config import RouterConfig
from protege.kv.fusion import LearnableRouter

ROUTER_FILE = "router.safetensors"  # in the learner's checkpoint folder

# -- pure functions ------------------------------------------------------------------------


def reward_weights(rewards: Tensor) -> Tensor:
    """[B] sequence rewards -> [B] row weights w_b = clip(reward, 0, 1)."""
    return rewards.float().clamp(0.0, 1.0)


def sequence_logprobs(logprobs: Tensor, mask: Tensor) -> Tensor:
    """ℓ_bi = Σ_t log p_i(y_bt) over real response tokens. [n,B,T], [B,T] -> [B,n]."""
    kept = torch.where(mask.bool().unsqueeze(0), logprobs.float(), torch.zeros_like(logprobs))
    return kept.sum(-1).t()


def mixture_nll(log_alpha: Tensor, sequence_logp: Tensor) -> Tensor:
    """−log Σ_i α_bi exp(ℓ_bi). [B,n] log α, [B,n] ℓ -> [B]."""
    return -torch.logsumexp(log_alpha + sequence_logp, dim=-1)


def responsibilities(log_alpha: Tensor, sequence_logp: Tensor) -> Tensor:
    """Posterior r_bi = α_bi exp(ℓ_bi) / Σ_j α_bj exp(ℓ_bj). [B,n] ×2 -> [B,n]."""
    return torch.softmax(log_alpha + sequence_logp, dim=-1)


def weights_entropy(log_alpha: Tensor) -> Tensor:
    """H(α_b) in nats, 0·log 0 = 0. [B,n] -> [B]."""
    alpha = log_alpha.exp()
    return -torch.where(alpha > 0, alpha * log_alpha, torch.zeros_like(alpha)).sum(-1)


def log_prior(weights: list[float]) -> Tensor:
    """[n] log of the normalised non-negative weights (−inf for a weight of 0)."""
    w = torch.tensor(weights, dtype=torch.float32)
    w = w / w.sum()
    return torch.where(w > 0, w.log(), torch.full_like(w, -math.inf))


def pooled_prompt(hidden: Tensor, prompt_mask: Tensor) -> Tensor:
    """[mean over real prompt tokens ⧺ last prompt position]. [B,P,d], [B,P] -> [B,2d]."""
    m = prompt_mask.to(hidden.dtype).unsqueeze(-1)
    mean = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return torch.cat([mean, hidden[:, -1]], dim=-1)  # left-padded: the last one is real


@torch.no_grad()
def prompt_features(module: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
    """The router's input: the student's last hidden states over the prompt, pooled, from a
    forward of the prompt alone (causal: the same states as in the full sequence). -> [B,2d]."""
    device = next(module.parameters()).device
    mask = prompt_mask.long().to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = module(
        input_ids=prompt_ids.to(device),
        attention_mask=mask,
        position_ids=positions,
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    return pooled_prompt(out.hidden_states[-1].float(), prompt_mask.to(device))


# -- the router ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepTotals:
    """One learner step's global normalisers (summed over data-parallel ranks)."""

    weight: float  # Σ_b w_b
    rows: float  # B
    labelled: float  # rows whose `fusion.field` names a teacher

    @property
    def updates(self) -> bool:
        return self.weight > 0


class FusionRouter:
    """The learned router: α [B,n] from prompt features, its optimizer and its state."""

    def __init__(
        self,
        hidden_size: int,
        prior: list[float],
        options: RouterConfig,
        device=None,
        reader: nn.Module | None = None,
    ):
        self.options = options
        self.reader = reader  # the frozen initial student the features come from (None: live)
        self.net = LearnableRouter(2 * hidden_size, len(prior), 1, width=options.width).to(device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=options.lr)
        self.prior = log_prior(prior).to(device)
        self._totals: StepTotals | None = None
        self._sums: dict[str, float] = {}

    def log_weights(self, features: Tensor) -> Tensor:
        """log α [B,n] (with gradient in the router's parameters)."""
        return torch.log_softmax(self.net.scores(features)[:, 0] + self.prior, dim=-1)

    def begin(self, totals: StepTotals) -> None:
        """Start a learner step: its micro-batches' losses are kept until `finish`."""
        self._totals = totals
        self.optimizer.zero_grad(set_to_none=True)
        self._losses: list[Tensor] = []  # per micro-batch, with the router's graph
        self._alpha_sums: list[Tensor] = []  # Σ_b α_b per micro-batch, for the balance term
        self._sums = {"router/loss": 0.0, "router/entropy": 0.0, "router/rewarded_rows": 0.0}
        if totals.labelled:
            self._sums["router/agreement"] = 0.0

    def accumulate(
        self, features: Tensor, sequence_logp: Tensor, rewards: Tensor, labels: Tensor | None
    ) -> Tensor:
        """One micro-batch's share of the step's router loss (applied at `finish`); returns
        the α [B,n] (detached) its fused target uses."""
        totals = self._totals
        log_alpha = self.log_weights(features)
        weights = reward_weights(rewards)
        weighted = (weights * mixture_nll(log_alpha, sequence_logp)).sum()
        entropy = weights_entropy(log_alpha).sum()
        rows = max(totals.rows, 1.0)
        loss = weighted / max(totals.weight, 1e-12) - self.options.entropy_bonus * entropy / rows
        if labels is not None and totals.labelled:
            known = labels >= 0
            picked = log_alpha[known].gather(-1, labels[known].long().unsqueeze(-1))
            loss = loss - self.options.label_weight * picked.sum() / totals.labelled
            agree = (log_alpha[known].argmax(-1) == labels[known]).sum()
            self._sums["router/agreement"] += float(agree) / totals.labelled
        self._losses.append(loss)
        self._alpha_sums.append(log_alpha.exp().sum(0))
        self._sums["router/loss"] += float(weighted.detach()) / max(totals.weight, 1e-12)
        self._sums["router/entropy"] += float(entropy.detach()) / rows
        self._sums["router/rewarded_rows"] += float((rewards > 0).sum())
        return log_alpha.detach().exp()

    def finish(self, all_reduce: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """Apply the step's one update (gradients summed over ranks by `all_reduce`); skipped
        when no row was rewarded or the gradient is not finite (`router/updated` 0). Every
        rank calls it (the balance term and the gradient are all-reduced)."""
        totals, params = self._totals, list(self.net.parameters())
        updated = totals.updates
        balance = self._balance(all_reduce) if updated else None
        if updated:
            loss = torch.stack([*self._losses, -self.options.balance * balance]).sum()
            if loss.requires_grad:  # a rank without rows contributes no gradient
                loss.backward()
            flat = all_reduce(torch.cat([_grad(p).flatten() for p in params]))
            updated = bool(torch.isfinite(flat).all())
        if updated:
            offset = 0
            for p in params:
                p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {**self._sums, "router/updated": float(updated)}
        if balance is not None:
            metrics["router/batch_entropy"] = float(balance.detach())
        self._totals, self._losses, self._alpha_sums = None, [], []
        return metrics

    def _balance(self, all_reduce: Callable[[Tensor], Tensor]) -> Tensor:
        """H(ᾱ), ᾱ = the step's mean α over every rank's rows: its value is global, its
        gradient flows through this rank's rows only (so the ranks' gradients add up)."""
        local = sum(self._alpha_sums, torch.zeros_like(self.prior))
        total = all_reduce(local.detach())
        mean = (local - local.detach() + total) / max(self._totals.rows, 1.0)
        return weights_entropy(mean.clamp_min(1e-12).log().unsqueeze(0)).squeeze(0)

    # -- state ------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        """The router's weights and Adam state as named tensors (safetensors-ready)."""
        out = {f"net.{k}": v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        for index, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                out[f"adam.{index}.{key}"] = torch.as_tensor(value).detach().cpu().clone()
        return out

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        device = self.prior.device
        net = {k[len("net.") :]: v.to(device) for k, v in tensors.items() if k.startswith("net.")}
        self.net.load_state_dict(net)
        state: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value.to(device)
        groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

    def save(self, folder: str | Path) -> None:
        save_file(self.state_tensors(), str(Path(folder) / ROUTER_FILE))

    def load(self, folder: str | Path) -> None:
        path = Path(folder) / ROUTER_FILE
        if not path.exists():
            raise ProtegeError(
                f"{path} is missing: the checkpoint was written by a run without "
                "fusion.mode=learned; resume with the fusion mode it was written with, or "
                "start a new run (trainer.resume=false)"
            )
        self.load_tensors(load_file(str(path)))


def _grad(param: Tensor) -> Tensor:
    return param.grad if param.grad is not None else torch.zeros_like(param)


def step_totals(
    rewards: Tensor | None,
    labels: Tensor | None,
    reduce: Callable[[float], float],
) -> StepTotals:
    """This step's global normalisers from this rank's shard; `reduce` sums over ranks."""
    if rewards is None:
        raise ProtegeError(
            "fusion.mode=learned trains its router on rewarded responses, but the batch has "
            "no rewards; configure reward.rules or reward.models"
        )
    labelled = 0.0 if labels is None else float((labels >= 0).sum())
    return StepTotals(
        weight=reduce(float(reward_weights(rewards).sum())),
        rows=reduce(float(rewards.numel())),
        labelled=reduce(labelled),
    )
