"""Speculative decoding is exact (unit and component tier): greedy speculative output is the
target's greedy output, and speculative sampling draws from the target's distribution
(chi-square tests on small vocabularies, seeded, with a power check against the draft)."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutput

from protege.modeling import load_model, load_tokenizer
from protege.osd.decoder import SpeculativeDecoder
from protege.osd.speculative import (
    acceptance_probability,
    residual_distribution,
    verify_greedy,
    verify_sampled,
)
from protege.tasks import tiny


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, null: bool = True) -> float:
    """P(χ² ≥ observed) for observed `counts` against `probs` (df = cells − 1), from the
    regularised upper incomplete gamma function: sf_χ²(x; d) = Q(d/2, x/2). Under the
    hypothesis tested (`null`) every cell must expect at least 5 draws."""
    expected = probs.double() * counts.sum()
    if null:
        assert float(expected.min()) >= 5, "too few samples per cell for a chi-square test"
    statistic = ((counts.double() - expected) ** 2 / expected).sum()
    df = torch.tensor((counts.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, statistic / 2))


def test_chi_square_helper_accepts_its_own_distribution_and_rejects_another():
    generator = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    draws = torch.multinomial(probs, 20_000, replacement=True, generator=generator)
    counts = torch.bincount(draws, minlength=4)
    assert chi_square_p_value(counts, probs) > 1e-3
    assert chi_square_p_value(counts, torch.full((4,), 0.25), null=False) < 1e-9


def test_verify_greedy_keeps_the_matching_prefix_then_the_target_choice():
    target = torch.zeros(1, 4, 5)
    target[0, torch.arange(4), torch.tensor([2, 3, 1, 4])] = 1.0  # argmax per position
    rows = torch.tensor([[2, 3, 0], [2, 3, 1], [0, 3, 1]])
    verdict = verify_greedy(rows, target.expand(3, 4, 5))
    assert verdict.accepted.tolist() == [2, 3, 0]
    assert verdict.next_token.tolist() == [1, 4, 2]
    assert verdict.rejected.tolist() == [True, False, True]
    plain = verify_greedy(torch.zeros(1, 0, dtype=torch.long), target[:, :1])
    assert (int(plain.accepted[0]), int(plain.next_token[0])) == (0, 2)


def test_residual_is_the_normalised_positive_part_and_falls_back_to_the_target():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    assert torch.allclose(residual_distribution(p, q), torch.tensor([1.0, 0.0, 0.0]).double())
    assert torch.equal(residual_distribution(p, p), p)
    assert torch.isclose(acceptance_probability(q, p), torch.tensor(0.2 + 0.3 + 0.2).double())


def test_one_round_emits_tokens_from_the_target_distribution():
    """One round over many rows: the first emitted token (accepted proposal or residual
    draw) is ~ p_1, the second (when the round emits one) ~ p_2, and the acceptance rate of
    the first proposal is Σ min(p_1, q_1)."""
    generator = torch.Generator().manual_seed(1)
    vocab, k, n = 5, 3, 200_000
    draft = torch.softmax(torch.randn(k, vocab, generator=generator), -1).double()
    target = torch.softmax(torch.randn(k + 1, vocab, generator=generator), -1).double()
    proposals = torch.stack(
        [
            torch.multinomial(draft[i].float(), n, replacement=True, generator=generator)
            for i in range(k)
        ],
        dim=1,
    )  # [n,k]
    verdict = verify_sampled(
        proposals, draft.expand(n, k, vocab), target.expand(n, k + 1, vocab), generator
    )
    first = torch.where(verdict.accepted > 0, proposals[:, 0], verdict.next_token)
    counts = torch.bincount(first, minlength=vocab)
    assert chi_square_p_value(counts, target[0]) > 1e-3
    assert chi_square_p_value(counts, draft[0], null=False) < 1e-9  # it tells the draft apart
    second_rows = verdict.accepted >= 1
    second = torch.where(
        verdict.accepted[second_rows] > 1,
        proposals[second_rows, 1],
        verdict.next_token[second_rows],
    )
    assert chi_square_p_value(torch.bincount(second, minlength=vocab), target[1]) > 1e-3
    expected = float(acceptance_probability(draft[0], target[0]))
    assert abs(float((verdict.accepted > 0).double().mean()) - expected) < 0.005


class BigramModel(torch.nn.Module):
    """A tiny random language model: next-token logits depend on the last token only, so
    the exact distribution of every sequence is a product of table rows."""

    def __init__(self, vocab: int, seed: int, scale: float):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(scale * torch.randn(vocab, vocab, generator=generator))

    def forward(self, input_ids: torch.Tensor, **_: object) -> CausalLMOutput:
        return CausalLMOutput(logits=self.table[input_ids])

    def sequence_probs(self, start: int, length: int, temperature: float) -> torch.Tensor:
        """P(y_1..y_length | start) for every sequence, in itertools.product order."""
        step = torch.softmax(self.table.detach().double() / temperature, -1)
        probs = []
        for sequence in itertools.product(range(self.table.shape[0]), repeat=length):
            p, last = 1.0, start
            for token in sequence:
                p, last = p * float(step[last, token]), token
            probs.append(p)
        return torch.tensor(probs, dtype=torch.float64)


@pytest.mark.parametrize(
    "vocab, n, scale",
    [(2, 800, 1.5), pytest.param(4, 10_000, 0.6, marks=pytest.mark.slow)],
    ids=["2-symbols", "4-symbols"],
)
def test_speculative_sampling_draws_whole_sequences_from_the_target(
    vocab: int, n: int, scale: float
):
    """Three tokens, two proposals a round (rounds straddle the output) through the real
    decoder: the frequencies of the vocab³ sequences match the target's exact joint
    distribution, and not the draft's."""
    length, k, temperature = 3, 2, 0.8
    target, draft = BigramModel(vocab, 3, scale), BigramModel(vocab, 4, scale)
    decoder = SpeculativeDecoder(draft, target, eos_ids=[], temperature=temperature)
    generator = torch.Generator().manual_seed(5)
    counts = torch.zeros(vocab**length)
    prompt = torch.tensor([0])
    for _ in range(n):
        tokens = decoder.generate(prompt, length, k, generator).response_ids.tolist()
        counts[sum(t * vocab ** (length - 1 - i) for i, t in enumerate(tokens))] += 1
    assert chi_square_p_value(counts, target.sequence_probs(0, length, temperature)) > 1e-3
    assert (
        chi_square_p_value(counts, draft.sequence_probs(0, length, temperature), null=False) < 1e-6
    )


@pytest.fixture(scope="module")
def tiny_pair():
    tokenizer = load_tokenizer("builtin:tiny/teacher")
    target = load_model("builtin:tiny/teacher").eval()
    return tokenizer, target


@pytest.mark.parametrize("draft_name", ["builtin:tiny/osd_draft", "builtin:tiny/student"])
def test_greedy_speculative_output_is_the_target_greedy_output(tiny_pair, draft_name):
    """Against HF `generate` of the target alone, on in-domain and shifted prompts, with a
    draft that is often wrong (many rejections) and k from 1 to 5."""
    tokenizer, target = tiny_pair
    draft = load_model(draft_name).eval()
    decoder = SpeculativeDecoder(draft, target, [tokenizer.eos_token_id], temperature=0.0)
    rows = tiny.load_rows(tiny.test_path())[:6] + tiny.load_rows(tiny.osd_traffic_path())[:6]
    rejected = 0
    for index, row in enumerate(rows):
        ids = torch.tensor(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
        decoded = decoder.generate(ids, max_new_tokens=8, k=1 + index % 5)
        reference = target.generate(
            ids[None],
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[0, ids.numel() :].tolist()
        if tokenizer.eos_token_id in reference:
            reference = reference[: reference.index(tokenizer.eos_token_id) + 1]
        assert decoded.response_ids.tolist() == reference, row["prompt"]
        rejected += int(decoded.rejected.sum())
    assert rejected > 0  # the rejection path ran


def test_no_speculation_is_plain_target_decoding(tiny_pair):
    tokenizer, target = tiny_pair
    decoder = SpeculativeDecoder(target, target, [tokenizer.eos_token_id], temperature=0.0)
    ids = torch.tensor(tokenizer("67+85=", add_special_tokens=False)["input_ids"])
    plain = decoder.generate(ids, max_new_tokens=8, k=0)
    assert tokenizer.decode(plain.response_ids, skip_special_tokens=True) == "152"
    assert plain.rounds == plain.response_ids.numel() and plain.num_verified == 0
    self_drafted = decoder.generate(ids, max_new_tokens=8, k=4)  # the target as its own draft
    assert self_drafted.num_accepted == self_drafted.num_verified == 4
    assert self_drafted.rounds == 1
