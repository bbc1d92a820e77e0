"""The explainers that ask a language model (`local`, `openai`): one prompt per feature with its
top examples, the activating tokens marked, asking for a short phrase."""

from __future__ import annotations

from typing import Protocol

from workers.explain.examples import FeatureExamples
from workers.explain.prompts import excerpts, prompt
from workers.explain.run import Written

PROMPT_VERSION = "explain-v1"
MAX_CHARS = 200
BEFORE, AFTER = 16, 4
"""Tokens shown before and after each example's peak: the prompt's length sets the cost."""


class Chat(Protocol):
    name: str

    def chat(self, prompts: list[list[dict[str, str]]], max_new_tokens: int = 24
             ) -> list[tuple[str, int | None]]: ...


def clean(answer: str) -> str:
    """The first line of an answer, without wrapping quotes or a final period, capped."""
    line = next((x for x in answer.strip().splitlines() if x.strip()), "").strip()
    line = line.strip("\"'`").rstrip(".").strip()
    return line[:MAX_CHARS] or "(no answer)"


def shown(ex: FeatureExamples, n: int) -> list:
    """The excerpts an explainer's prompt shows: the top n examples around their peaks."""
    return [w.around(BEFORE, AFTER) for w in ex.top[:n]]


class LLMExplainer:
    """Explains a batch of features with one batched call of its chat backend."""

    prompt_version = PROMPT_VERSION

    def __init__(self, name: str, backend: Chat, *, n_examples: int = 8):
        self.name, self.backend, self.n_examples = name, backend, n_examples
        self.model = backend.name

    def explain(self, batch: list[FeatureExamples]) -> list[Written]:
        p = prompt(self.prompt_version)
        answers = self.backend.chat(
            [p.messages(examples=excerpts(shown(ex, self.n_examples))) for ex in batch])
        return [Written(clean(text), used) for text, used in answers]
