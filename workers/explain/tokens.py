"""The `tokens` explainer: no language model, a deterministic summary of a feature's top
examples (the tokens it peaks on with counts, their typical left context, its top logit
tokens)."""

from __future__ import annotations

from collections import Counter

from workers.explain.examples import FeatureExamples
from workers.explain.run import Written

NAME = "tokens"
PROMPT_VERSION = "tokens-v1"
"""Versions the summary's wording: a change here is a new explanation, not a rewrite."""
N_PEAK, N_LEFT, N_LOGITS = 3, 2, 3


def show(token: str) -> str:
    """A token as the summary quotes it: stripped of surrounding whitespace where it has other
    characters, else named (space, newline, tab)."""
    text = token.strip()
    if text:
        return f'"{text}"'
    names = {" ": "space", "\n": "newline", "\t": "tab"}
    return names.get(token[:1], "whitespace") if token else "empty"


def _counted(counter: Counter, n: int) -> str:
    return ", ".join(f"{show(t)} ({c})" for t, c in counter.most_common(n))


def explain(ex: FeatureExamples) -> str:
    """One line: what the top examples peak on, what comes before, what the feature promotes."""
    if not ex.fires:
        return "never fires on the harvested text"
    peaks = Counter()
    for t, c in ex.top_tokens:
        peaks[t] += c
    left = Counter(w.tokens[w.peak - 1] for w in ex.top if 0 < w.peak < len(w.tokens))
    parts = [f"peaks on {_counted(peaks, N_PEAK)}"]
    if left:
        parts.append(f"after {_counted(left, N_LEFT)}")
    logits = [show(t) for t in ex.top_logits[:N_LOGITS] if t]
    if logits:
        parts.append(f"promotes {', '.join(logits)}")
    return "; ".join(parts)


class TokensExplainer:
    """The `tokens` explainer as a run uses it."""

    name, model, prompt_version = NAME, "", PROMPT_VERSION

    def explain(self, batch: list[FeatureExamples]) -> list[Written]:
        return [Written(explain(ex)) for ex in batch]
