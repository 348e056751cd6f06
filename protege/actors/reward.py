"""The reward worker: sequence rewards from rules and HF reward models, as a plain class.

reward[b] = Σ_i weight_i × component_i[b] over `reward.rules` then `reward.models`; each
component's batch mean (unweighted) goes to `extras["reward/<name>"]`.
Shapes: B batch rows, P prompt tokens, T response tokens.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from protege.capabilities import reward_labels_problem
from protege.config import RewardConfig, RewardModel
from protege.memory import peak_metrics
from protege.modeling import load_tokenizer, resolve_path
from protege.records import RolloutBatch
from protege.rewards import RULES, check_rules


class RewardScorer:
    """Attaches `rewards` [B] float32 to a batch. `tokenizer` is the student's (it decodes
    the prompt and response ids); each reward model reads the decoded prompt ⧺ response
    with its own tokenizer. `micro_batch_size` bounds reward-model forwards (None: the
    config's `reward.micro_batch_size`)."""

    def __init__(self, config: RewardConfig, tokenizer: str, micro_batch_size: int | None = None):
        check_rules(config.rules)
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.config = config
        self.tokenizer = load_tokenizer(tokenizer)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.models = [
            SequenceRewardModel(spec, f"reward.models[{i}]", self.device)
            for i, spec in enumerate(config.models)
        ]
        self.micro_batch_size = micro_batch_size or config.micro_batch_size
        self.keys = component_keys(config)

    def score(self, batch: RolloutBatch) -> RolloutBatch:
        """The batch with `rewards` set and per-component means added to `extras`, plus the
        `reward/seconds` spent here; unchanged when no reward is configured."""
        if not self.config.enabled:
            return batch
        started = time.perf_counter()
        scored = self._score(batch)
        seconds = {"reward/seconds": time.perf_counter() - started, **peak_metrics("reward")}
        return scored.replace(extras={**scored.extras, **seconds})

    def _score(self, batch: RolloutBatch) -> RolloutBatch:
        if batch.size == 0:
            return batch.replace(rewards=torch.zeros(0))
        responses = decode_responses(self.tokenizer, batch.response_ids, batch.response_mask)
        components = [
            self._rule_rewards(i, responses, batch.answers) for i in range(len(self.config.rules))
        ]
        if self.models:
            prompts = decode_prompts(self.tokenizer, batch.prompt_ids, batch.prompt_mask)
            texts = [prompt + response for prompt, response in zip(prompts, responses)]
            components += [model.scores(texts, self.micro_batch_size) for model in self.models]
        stacked = torch.stack(components, dim=1)  # [B,C] float64
        weights = torch.tensor(
            [rule.weight for rule in self.config.rules] + [m.weight for m in self.config.models],
            dtype=torch.float64,
        )
        rewards = (stacked * weights).sum(dim=1).float()  # [B]
        extras = {key: float(stacked[:, c].mean()) for c, key in enumerate(self.keys)}
        extras["reward/total"] = float(rewards.mean())
        return batch.replace(rewards=rewards, extras={**batch.extras, **extras})

    def _rule_rewards(
        self, index: int, responses: list[str], answers: tuple[str | None, ...]
    ) -> Tensor:
        """One rule over every row. [B] float64; errors name the rule and the row."""
        rule = self.config.rules[index]
        if answers and len(answers) != len(responses):
            raise ValueError(f"batch has {len(answers)} answers for {len(responses)} rows")
        values = []
        for row, response in enumerate(responses):
            answer = answers[row] if answers else None
            try:
                values.append(RULES[rule.name](response, answer, rule))
            except ValueError as error:
                raise ValueError(
                    f"reward.rules[{index}] ({rule.name}), batch row {row}: {error}"
                ) from None
        return torch.tensor(values, dtype=torch.float64)


class SequenceRewardModel:
    """An HF sequence-classification model with one output, read at the last real token."""

    def __init__(self, spec: RewardModel, key: str, device: torch.device):
        path = resolve_path(spec.path)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.float32, output_loading_info=True
        )
        if info["missing_keys"]:
            missing = ", ".join(sorted(info["missing_keys"])[:3])
            raise ValueError(
                f"{key}.path: {spec.path!r} has no trained weights for {missing}; "
                "it is not a sequence-classification reward model"
            )
        reason = reward_labels_problem(key, spec.path, model.config.num_labels)
        if reason:
            raise ValueError(reason)
        self.weight = spec.weight
        self.tokenizer = _padded_tokenizer(
            AutoTokenizer.from_pretrained(path), model, f"{key}.path"
        )
        self.max_length = _max_length(self.tokenizer, model)
        self.model = model.to(device).eval()
        self.device = device

    @torch.inference_mode()
    def scores(self, texts: list[str], micro_batch_size: int | None = None) -> Tensor:
        """One score per text. [B] float64 on CPU."""
        step = micro_batch_size or len(texts)
        out = []
        for start in range(0, len(texts), step):
            inputs = self.tokenizer(
                texts[start : start + step],
                return_tensors="pt",
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
            ).to(self.device)
            out.append(self.model(**inputs).logits[:, 0].double().cpu())
        return torch.cat(out)


def component_keys(config: RewardConfig) -> list[str]:
    """`extras` keys, rules then models: "reward/<rule name>" ("reward/<name>_<i>" when a
    name repeats) and "reward/model_<i>"."""
    names = [rule.name for rule in config.rules]
    keys = [
        f"reward/{n}" if names.count(n) == 1 else f"reward/{n}_{i}" for i, n in enumerate(names)
    ]
    return keys + [f"reward/model_{i}" for i in range(len(config.models))]


def decode_responses(
    tokenizer: PreTrainedTokenizerBase, response_ids: Tensor, response_mask: Tensor
) -> list[str]:
    """Response texts: the masked tokens up to (not including) the first EOS, without special
    tokens. [B,T] -> B strings."""
    rows = []
    for ids, mask in zip(response_ids.tolist(), response_mask.tolist()):
        kept = [token for token, real in zip(ids, mask) if real]
        if tokenizer.eos_token_id in kept:
            kept = kept[: kept.index(tokenizer.eos_token_id)]
        rows.append(kept)
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def decode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompt_ids: Tensor, prompt_mask: Tensor
) -> list[str]:
    """Prompt texts without padding or special tokens. [B,P] -> B strings."""
    rows = [
        [t for t, real in zip(ids, mask) if real]
        for ids, mask in zip(prompt_ids.tolist(), prompt_mask.tolist())
    ]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def _padded_tokenizer(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, key: str
) -> PreTrainedTokenizerBase:
    """Right-padding with the pad id the model's head looks for: HF sequence classifiers read
    the last token that is not `config.pad_token_id`, so tokenizer and config must agree.
    Left truncation keeps the response's end, where the score is read."""
    config = model.config.get_text_config()
    if config.pad_token_id is not None:
        tokenizer.pad_token_id = config.pad_token_id
    elif tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"{key}: the reward model's tokenizer has neither a pad nor an EOS token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    return tokenizer


def _max_length(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> int | None:
    """The longest input both the tokenizer and the position embeddings accept, if known."""
    limits = [getattr(model.config.get_text_config(), "max_position_embeddings", None)]
    if tokenizer.model_max_length < 1_000_000_000:  # HF uses a huge sentinel for "no limit"
        limits.append(tokenizer.model_max_length)
    known = [limit for limit in limits if limit]
    return min(known) if known else None
