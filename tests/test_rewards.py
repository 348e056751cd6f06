"""Rule rewards (unit) and the reward worker with a tiny local reward model (component)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, Qwen2ForSequenceClassification

from protege.actors.reward import RewardScorer, decode_responses
from protege.config import RewardConfig, RewardModel, RewardRule
from protege.records import RolloutBatch
from protege.rewards import (
    RULES,
    check_rules,
    exact_match,
    last_number,
    length_penalty,
    numeric_match,
    regex,
)
from protege.tasks.tiny_models import build_char_tokenizer, tiny_config

EM = RewardRule(name="exact_match")
NUM = RewardRule(name="numeric_match")


# ---------------------------------------------------------------- rules (unit)


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("85", "85", 1.0),
        ("  85\n", "85", 1.0),
        ("85", " 85 ", 1.0),
        ("085", "85", 0.0),
        ("85 ", "86", 0.0),
        ("", "85", 0.0),
        ("", "", 1.0),
        ("   ", "", 1.0),
        ("The answer is 85", "85", 0.0),
    ],
)
def test_exact_match(response, answer, expected):
    assert exact_match(response, answer, EM) == expected


@pytest.mark.parametrize(
    "text, number",
    [
        ("85", "85"),
        ("-7", "-7"),
        ("x=-7", "-7"),
        ("10-5", "5"),  # a minus between digits is an operator, not a sign
        ("1,234,567", "1234567"),
        ("1,2345", "2345"),  # not a thousands separator
        ("3.25 and 4.5.", "4.5"),
        ("so 12 apples, then 40.", "40"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_last_number(text, number):
    found = last_number(text)
    assert (None if found is None else str(found)) == number


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("85", "85", 1.0),
        ("47+38=85", "85", 1.0),
        ("The answer is 85.", "85", 1.0),
        ("85.0000001", "85", 1.0),  # within 1e-6
        ("85.00001", "85", 0.0),
        ("-12", "-12", 1.0),
        ("12", "-12", 0.0),
        ("total: 1,234", "1234", 1.0),
        ("1234", "1,234", 1.0),
        ("12345678901234567891", "12345678901234567890", 0.0),  # exact beyond float precision
        ("", "85", 0.0),
        ("   ", "85", 0.0),
        ("eighty-five", "85", 0.0),
    ],
)
def test_numeric_match(response, answer, expected):
    assert numeric_match(response, answer, NUM) == expected


def test_numeric_match_answer_without_number():
    with pytest.raises(ValueError, match="numeric_match.*'abc' has no number"):
        numeric_match("85", "abc", NUM)


@pytest.mark.parametrize("name", ["exact_match", "numeric_match"])
def test_missing_answer_names_rule_and_data_field(name):
    with pytest.raises(ValueError, match=rf"{name}.*data\.train.*`answer`"):
        RULES[name]("85", None, RewardRule(name=name))


@pytest.mark.parametrize(
    "pattern, response, expected",
    [
        (r"\d+", "the answer is 85", 1.0),  # re.search: a partial match counts
        (r"^\d+$", "the answer is 85", 0.0),  # anchors make it a full match
        (r"^\d+$", "85", 1.0),
        (r"(?i)answer", "ANSWER: 3", 1.0),
        (r"\d", "", 0.0),
        (r"^$", "", 1.0),
    ],
)
def test_regex(pattern, response, expected):
    assert regex(response, None, RewardRule(name="regex", pattern=pattern)) == expected


@pytest.mark.parametrize(
    "response, target, expected",
    [
        ("85", 2, 0.0),
        ("  85  ", 2, 0.0),  # surrounding whitespace is not counted
        ("8", 2, -0.5),
        ("", 2, -1.0),
        ("8555", 2, -1.0),  # |4-2|/2 = 1
        ("85555555", 2, -1.0),  # clipped at -1
        ("123456789", 10, -0.1),
        ("", 0, 0.0),  # target 0: divide by 1, no division by zero
        ("a", 0, -1.0),
    ],
)
def test_length_penalty(response, target, expected):
    rule = RewardRule(name="length_penalty", target_length=target)
    assert length_penalty(response, None, rule) == pytest.approx(expected)


def test_every_config_rule_name_is_registered():
    names = set(RewardRule.model_fields["name"].annotation.__args__)
    assert names == set(RULES)


@pytest.mark.parametrize(
    "rule, key",
    [
        (RewardRule(name="regex"), r"reward\.rules\[1\]\.pattern"),
        (RewardRule(name="regex", pattern="(unclosed"), r"reward\.rules\[1\]\.pattern: invalid"),
        (RewardRule(name="length_penalty"), r"reward\.rules\[1\]\.target_length"),
        (
            RewardRule(name="exact_match", pattern="x"),
            r"reward\.rules\[1\]\.pattern: only the regex",
        ),
        (
            RewardRule(name="regex", pattern="x", target_length=3),
            r"reward\.rules\[1\]\.target_length",
        ),
    ],
)
def test_bad_rules_raise_with_key(rule, key):
    with pytest.raises(ValueError, match=key):
        check_rules([EM, rule])


# ---------------------------------------------------------------- worker (component)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    """The character tokenizer, and a random tiny Qwen2 sequence classifier (num_labels=1)
    saved without a pad id in its config (the scorer must set it for batching)."""
    root = tmp_path_factory.mktemp("reward")
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    config = tiny_config(layers=2, hidden=32, heads=4, kv_heads=2)
    config.num_labels = 1
    torch.manual_seed(7)
    model = Qwen2ForSequenceClassification(config)
    model.config.pad_token_id = None
    model.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    config.num_labels = 2
    two = Qwen2ForSequenceClassification(config)
    two.save_pretrained(root / "rm2")
    tokenizer.save_pretrained(root / "rm2")
    return {"tokenizer": str(root / "tokenizer"), "rm": str(root / "rm"), "rm2": str(root / "rm2")}


def make_batch(tokenizer, prompts: list[str], responses: list[str], answers=()) -> RolloutBatch:
    """Left-padded prompts; right-padded responses, each followed by EOS (mask covers it)."""
    prompt_rows = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    response_rows = [
        tokenizer.encode(r, add_special_tokens=False) + [tokenizer.eos_token_id] for r in responses
    ]
    P = max(map(len, prompt_rows))
    T = max(map(len, response_rows))
    pad = tokenizer.pad_token_id
    prompt_ids = torch.tensor([[pad] * (P - len(r)) + r for r in prompt_rows])
    prompt_mask = torch.tensor([[False] * (P - len(r)) + [True] * len(r) for r in prompt_rows])
    response_ids = torch.tensor([r + [pad] * (T - len(r)) for r in response_rows])
    response_mask = torch.tensor([[True] * len(r) + [False] * (T - len(r)) for r in response_rows])
    return RolloutBatch(
        prompt_ids, prompt_mask, response_ids, response_mask, answers=tuple(answers)
    )


@pytest.fixture(scope="module")
def tok(dirs):
    return AutoTokenizer.from_pretrained(dirs["tokenizer"])


def test_decoding_stops_at_eos_and_mask(tok):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids = tok.encode("85", add_special_tokens=False)
    seven = tok.encode("7", add_special_tokens=False)
    response_ids = torch.tensor(
        [
            ids + [eos] + seven,  # tokens after EOS inside the mask are dropped
            ids + seven + [pad],  # tokens outside the mask are dropped
            [eos, *seven, pad, pad],  # EOS first: empty response
        ]
    )
    response_mask = torch.tensor(
        [[True] * 4, [True, True, False, False], [True, True, False, False]]
    )
    assert decode_responses(tok, response_ids, response_mask) == ["85", "85", ""]


def test_rules_weights_combine(dirs, tok):
    config = RewardConfig(
        rules=[
            RewardRule(name="exact_match", weight=2.0),
            RewardRule(name="length_penalty", weight=0.5, target_length=2),
            RewardRule(name="regex", weight=-1.0, pattern="^1"),
        ]
    )
    scorer = RewardScorer(config, dirs["tokenizer"])
    batch = make_batch(
        tok, ["47+38=", "1+2=", "5+5="], ["85", "3", "100"], answers=["85", "3", "10"]
    )
    batch = batch.replace(extras={"rollout/kept": 1.0})
    out = scorer.score(batch)
    # exact 1,1,0; length 0,-0.5,-0.5; regex 0,0,1
    expected = torch.tensor([2.0, 2.0 - 0.25, -0.25 - 1.0])
    assert out.rewards.dtype == torch.float32 and out.rewards.shape == (3,)
    torch.testing.assert_close(out.rewards, expected)
    assert out.extras["reward/exact_match"] == pytest.approx(2 / 3)
    assert out.extras["reward/length_penalty"] == pytest.approx(-1 / 3)
    assert out.extras["reward/regex"] == pytest.approx(1 / 3)
    assert out.extras["reward/total"] == pytest.approx(float(expected.mean()))
    assert out.extras["rollout/kept"] == 1.0
    assert batch.rewards is None  # the input batch is not mutated


def test_repeated_rule_names_get_distinct_keys(dirs, tok):
    config = RewardConfig(
        rules=[RewardRule(name="regex", pattern="5"), RewardRule(name="regex", pattern="8")]
    )
    out = RewardScorer(config, dirs["tokenizer"]).score(make_batch(tok, ["1+4="], ["5"]))
    assert out.extras["reward/regex_0"] == 1.0 and out.extras["reward/regex_1"] == 0.0


def test_missing_answer_names_rule_row_and_field(dirs, tok):
    scorer = RewardScorer(RewardConfig(rules=[NUM]), dirs["tokenizer"])
    batch = make_batch(tok, ["1+1=", "2+2="], ["2", "4"], answers=["2", None])
    with pytest.raises(
        ValueError, match=r"reward\.rules\[0\] \(numeric_match\), batch row 1.*data\.train"
    ):
        scorer.score(batch)
    with pytest.raises(ValueError, match=r"batch row 0.*`answer`"):
        scorer.score(make_batch(tok, ["1+1="], ["2"]))  # no answers at all


def test_no_reward_configured_is_a_no_op(dirs, tok):
    batch = make_batch(tok, ["1+1="], ["2"])
    assert RewardScorer(RewardConfig(), dirs["tokenizer"]).score(batch) is batch


def test_bad_config_fails_at_construction(dirs):
    with pytest.raises(ValueError, match=r"reward\.rules\[0\]\.pattern"):
        RewardScorer(RewardConfig(rules=[RewardRule(name="regex")]), dirs["tokenizer"])
    with pytest.raises(ValueError, match=r"reward\.models\[1\]\.path.*num_labels=2"):
        RewardScorer(
            RewardConfig(models=[RewardModel(path=dirs["rm"]), RewardModel(path=dirs["rm2"])]),
            dirs["tokenizer"],
        )


def test_causal_lm_is_rejected_as_reward_model(dirs, tmp_path):
    from protege.tasks.tiny_models import build_tiny_model

    lm = build_tiny_model(tiny_config(layers=1, hidden=32), seed=0)
    lm.config.num_labels = 1  # even with one label, the score head would be random
    lm.save_pretrained(tmp_path / "lm")
    build_char_tokenizer().save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match=r"reward\.models\[0\]\.path.*no trained weights"):
        RewardScorer(
            RewardConfig(models=[RewardModel(path=str(tmp_path / "lm"))]), dirs["tokenizer"]
        )


PROMPTS = ["47+38=", "1+2=", "99+99=", "5+5="]
RESPONSES = ["85", "3", "198", "1000000"]


def reference_score(path: str, text: str) -> float:
    """Unbatched forward of the saved model on one text, straight through HF."""
    model = Qwen2ForSequenceClassification.from_pretrained(path).eval()
    ids = AutoTokenizer.from_pretrained(path)(text, return_tensors="pt")
    with torch.inference_mode():
        return float(model(**ids).logits[0, 0])


def test_reward_model_scores_prompt_and_response(dirs, tok):
    scorer = RewardScorer(
        RewardConfig(models=[RewardModel(path=dirs["rm"], weight=1.0)]), dirs["tokenizer"]
    )
    rewards = scorer.score(make_batch(tok, PROMPTS, RESPONSES)).rewards
    expected = torch.tensor(
        [reference_score(dirs["rm"], p + r) for p, r in zip(PROMPTS, RESPONSES)]
    )
    torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=1e-5)
    assert rewards.unique().numel() == len(PROMPTS)  # a random model tells the rows apart


def test_reward_model_batched_equals_unbatched_and_deterministic(dirs, tok):
    config = RewardConfig(models=[RewardModel(path=dirs["rm"], weight=0.5)])
    batch = make_batch(tok, PROMPTS, RESPONSES)
    whole = RewardScorer(config, dirs["tokenizer"]).score(batch).rewards
    again = RewardScorer(config, dirs["tokenizer"]).score(batch).rewards
    micro = RewardScorer(config, dirs["tokenizer"], micro_batch_size=3).score(batch).rewards
    single = RewardScorer(config, dirs["tokenizer"], micro_batch_size=1).score(batch).rewards
    torch.testing.assert_close(whole, again, atol=0, rtol=0)
    torch.testing.assert_close(whole, micro, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole, single, atol=1e-5, rtol=1e-5)


def test_reward_model_and_rule_weights_combine(dirs, tok):
    rm = RewardModel(path=dirs["rm"], weight=0.5)
    batch = make_batch(tok, PROMPTS, RESPONSES, answers=["85", "3", "0", "0"])
    model_only = RewardScorer(RewardConfig(models=[rm]), dirs["tokenizer"]).score(batch)
    both = RewardScorer(
        RewardConfig(rules=[RewardRule(name="exact_match", weight=3.0)], models=[rm]),
        dirs["tokenizer"],
    ).score(batch)
    correct = torch.tensor([1.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(both.rewards, model_only.rewards + 3.0 * correct)
    assert both.extras["reward/model_0"] == pytest.approx(
        2 * float(model_only.rewards.mean()), abs=1e-5
    )


def test_bad_rule_is_refused_when_the_run_is_built_not_when_the_worker_starts():
    from protege.config import load_config
    from protege.run import check_setup

    config = load_config("rl_distill", ["reward.rules=[{name: regex}]", "trainer.workers=local"])
    with pytest.raises(ValueError, match=r"reward.rules\[0\].pattern"):
        check_setup(config, config.build_algorithm())
