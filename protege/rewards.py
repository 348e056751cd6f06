"""Rule rewards: pure functions from a decoded response (and its reference answer) to a float.

Every rule has the signature `fn(response_text, answer, rule) -> float` and is listed in
`RULES` under the name `reward.rules[i].name` selects. `check_rules` validates a rule list
once, at start-up, with messages naming the dotted config key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal

from protege.config import RewardRule

RuleFn = Callable[[str, "str | None", RewardRule], float]

NUMERIC_TOLERANCE = Decimal("1e-6")

# A number: optional minus sign, then digits with optional thousands separators ("1,234"),
# then an optional decimal part. The minus counts as a sign only where it cannot be a binary
# operator: "x=-5" and "-5" are -5, but "10-5" ends with the number 5 (the expression's
# last operand), as in the GSM8K-style "last number" extraction.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def last_number(text: str) -> Decimal | None:
    """The last number written in `text` (commas as thousands separators), or None."""
    matches = _NUMBER.findall(text)
    return Decimal(matches[-1].replace(",", "")) if matches else None


def exact_match(response_text: str, answer: str | None, rule: RewardRule) -> float:
    """1 when the response equals the answer once surrounding whitespace is stripped, else 0."""
    answer = _require_answer(answer, rule)
    return float(response_text.strip() == answer.strip())


def numeric_match(response_text: str, answer: str | None, rule: RewardRule) -> float:
    """1 when the response's last number equals the answer's number within 1e-6, else 0.
    Compared as decimals, so "85.0" matches "85" and large integers compare exactly."""
    answer = _require_answer(answer, rule)
    expected = last_number(answer)
    if expected is None:
        raise ValueError(f"rule 'numeric_match': the reference answer {answer!r} has no number")
    predicted = last_number(response_text)
    return float(predicted is not None and abs(predicted - expected) <= NUMERIC_TOLERANCE)


def regex(response_text: str, answer: str | None, rule: RewardRule) -> float:
    """1 when `rule.pattern` matches anywhere in the response (`re.search`, so anchor with
    ^...$ for a full match; inline flags such as (?i) work), else 0."""
    return float(re.search(rule.pattern, response_text) is not None)


def length_penalty(response_text: str, answer: str | None, rule: RewardRule) -> float:
    """−min(1, |n − target| / max(target, 1)) for n characters of the stripped response.

    Characters, not tokens, so the same setting means the same length for every student
    tokenizer. Clipped to [−1, 0] so that, like the 0/1 rules, one unit of `weight` is the
    most the rule can move a reward — a runaway response cannot swamp the correctness terms.
    """
    target = rule.target_length
    return -min(1.0, abs(len(response_text.strip()) - target) / max(target, 1))


RULES: dict[str, RuleFn] = {
    "exact_match": exact_match,
    "numeric_match": numeric_match,
    "regex": regex,
    "length_penalty": length_penalty,
}

NEEDS_ANSWER = frozenset({"exact_match", "numeric_match"})
_RULE_FIELDS = {"pattern": "regex", "target_length": "length_penalty"}  # field -> rule reading it


def check_rules(rules: list[RewardRule]) -> None:
    """Raise ValueError naming `reward.rules[i].<field>` for a missing, unused or invalid
    rule parameter."""
    for i, rule in enumerate(rules):
        if rule.name not in RULES:  # the config's Literal should make this unreachable
            raise ValueError(
                f"reward.rules[{i}].name: unknown rule {rule.name!r}; known: {', '.join(RULES)}"
            )
        for field, owner in _RULE_FIELDS.items():
            value = getattr(rule, field)
            if rule.name == owner and value is None:
                raise ValueError(f"reward.rules[{i}].{field}: the {owner} rule needs a {field}")
            if rule.name != owner and value is not None:
                raise ValueError(
                    f"reward.rules[{i}].{field}: only the {owner} rule reads a {field}, "
                    f"this rule is {rule.name!r}; remove it"
                )
        if rule.name == "regex":
            try:
                re.compile(rule.pattern)
            except re.error as error:
                raise ValueError(
                    f"reward.rules[{i}].pattern: invalid regular expression {rule.pattern!r}: {error}"
                ) from None


def _require_answer(answer: str | None, rule: RewardRule) -> str:
    if answer is None:
        raise ValueError(
            f"rule {rule.name!r} needs a reference answer but this row has none; "
            "give every data.train row an `answer` field, or drop the rule"
        )
    return answer
