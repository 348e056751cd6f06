"""Task accuracy on held-out prompts, decoded greedily by the rollout workers."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from protege.data import PromptSource, Row


def exact_match(prediction: str, answer: str) -> bool:
    """The generated text (up to EOS, special tokens dropped) equals the answer, stripped."""
    return prediction.strip() == answer.strip()


class Evaluator:
    """Greedy exact-match accuracy of the current student on `rows` (which need answers)."""

    def __init__(
        self,
        rows: list[Row],
        tokenizer: PreTrainedTokenizerBase,
        max_new_tokens: int,
        checker: Callable[[str, str], bool] = exact_match,
        chat_template: bool = False,
    ):
        missing = [i for i, row in enumerate(rows, start=1) if row.answer is None]
        if missing:
            raise ValueError(f"evaluation rows need an 'answer'; row {missing[0]} has none")
        self.rows, self.max_new_tokens, self.checker = rows, max_new_tokens, checker
        source = PromptSource(rows, tokenizer, batch_size=len(rows), chat_template=chat_template)
        self.prompts = source.next(step=0)

    def run(self, workers) -> dict[str, float]:
        texts = workers.greedy_texts(self.prompts, self.max_new_tokens)
        correct = sum(self.checker(t, a) for t, a in zip(texts, self.prompts.answers))
        return {"accuracy": correct / len(texts)}
