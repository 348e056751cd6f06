"""Evaluation metrics as pure functions: task accuracy, diversity, calibration, agreement.

Inputs are plain Python sequences or CPU tensors; nothing here loads a model. Shapes: B
responses, T response tokens, V vocab. Every formula is tested against a brute-force
definition in `tests/test_eval_metrics.py`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from protege.algorithms.divergences import masked_sum


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021):
    1 − C(n−c, k) / C(n, k), computed as a product so large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(correct_per_prompt: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over prompts; each prompt's list holds its samples' correctness."""
    if not correct_per_prompt:
        raise ValueError("mean_pass_at_k needs at least one prompt")
    scores = [pass_at_k(len(c), sum(map(bool, c)), k) for c in correct_per_prompt]
    return sum(scores) / len(scores)


def ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """Distinct n-grams / all n-grams over a set of responses (Li et al. 2016); 0 when the
    responses hold no n-gram at all."""
    grams = [g for seq in sequences for g in ngrams(seq, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(
    hypothesis: Sequence[Hashable], references: Sequence[Sequence[Hashable]], max_n: int = 4
) -> float:
    """Sentence BLEU with uniform weights over the n-gram orders the hypothesis has (up to
    `max_n`), clipped counts against all references, the brevity penalty against the closest
    reference length, and zero matches smoothed to 0.1 (Chen & Cherry 2014, method 1).

    Orders longer than the hypothesis are left out rather than zeroing the score: the tiny
    task's answers are two or three tokens long."""
    if not hypothesis or not references:
        return 0.0
    log_precisions = []
    for n in range(1, min(max_n, len(hypothesis)) + 1):
        counts = Counter(ngrams(hypothesis, n))
        most = Counter()
        for ref in references:
            for gram, count in Counter(ngrams(ref, n)).items():
                most[gram] = max(most[gram], count)
        matches = sum(min(count, most[gram]) for gram, count in counts.items())
        total = sum(counts.values())
        log_precisions.append(math.log((matches if matches else 0.1) / total))
    closest = min((abs(len(r) - len(hypothesis)), len(r)) for r in references)[1]
    brevity = 0.0 if len(hypothesis) >= closest else 1.0 - closest / len(hypothesis)
    return math.exp(brevity + sum(log_precisions) / len(log_precisions))


def self_bleu(groups: Sequence[Sequence[Sequence[Hashable]]], max_n: int = 4) -> float:
    """Mean BLEU of each sample against the other samples of the same prompt (Zhu et al.
    2018); high means the samples repeat each other. Groups of fewer than two are skipped;
    NaN when none is left."""
    scores = []
    for samples in groups:
        for i, hypothesis in enumerate(samples):
            others = [s for j, s in enumerate(samples) if j != i]
            if others:
                scores.append(bleu(hypothesis, others, max_n))
    return sum(scores) / len(scores) if scores else math.nan


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], bins: int = 10
) -> float:
    """ECE with `bins` equal-width bins: Σ_b |B_b|/N · |accuracy(B_b) − confidence(B_b)|.
    Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of 0 goes to the first."""
    if len(confidences) != len(correct) or not confidences:
        raise ValueError("expected_calibration_error needs equally long, non-empty inputs")
    conf = torch.as_tensor(list(confidences), dtype=torch.float64)
    if bool(((conf < 0) | (conf > 1)).any()):
        raise ValueError("confidences must lie in [0, 1]")
    hits = torch.as_tensor([bool(c) for c in correct], dtype=torch.float64)
    index = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf)
    hit_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, hits)
    return float((conf_sum - hit_sum).abs().sum() / len(conf))


def mean_token_entropy(logprobs: Tensor, mask: Tensor) -> float:
    """Exact mean entropy (nats) of the next-token distributions at the masked positions.
    logprobs [B,T,V] (log-softmax), mask [B,T] -> scalar."""
    plogp = torch.where(logprobs > -math.inf, logprobs.exp() * logprobs, torch.zeros_like(logprobs))
    per_position = -plogp.sum(-1)
    return float(masked_sum(per_position, mask) / max(float(mask.sum()), 1.0))


def sampled_token_entropy(token_logprobs: Tensor, mask: Tensor) -> float:
    """Monte Carlo mean token entropy: the mean −log q(y_t) of tokens sampled from q itself
    (E_q[−log q] = H(q); unbiased only when sampled at temperature 1 without top-p).
    token_logprobs, mask [B,T] -> scalar."""
    return float(-masked_sum(token_logprobs, mask) / max(float(mask.sum()), 1.0))


def sampled_kl_per_token(sampler_logprobs: Tensor, other_logprobs: Tensor, mask: Tensor) -> float:
    """Monte Carlo KL(s‖o) per token from sequences sampled from s: Σ(log s − log o) over
    all sampled tokens / token count. Each sequence's sum is an unbiased estimate of the
    sequence-level KL. With s = student it is the reverse KL KL(q_θ‖p_T); with s = teacher
    (teacher-written responses) the forward KL KL(p_T‖q_θ). [B,T] each -> scalar."""
    return float(masked_sum(sampler_logprobs - other_logprobs, mask) / max(float(mask.sum()), 1.0))


def sequence_confidence(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Probability of each whole response, exp Σ_t log q(y_t). [B,T] -> [B]."""
    return torch.where(mask.bool(), token_logprobs, torch.zeros_like(token_logprobs)).sum(-1).exp()
