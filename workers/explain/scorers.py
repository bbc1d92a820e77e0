"""Scorers of explanations: `detection` (does the scorer model say an excerpt holds the
feature?), `fuzzing` (are the marked tokens the right ones?) and `simulation` (the expected
0-9 activation of every token, correlated with the true ones). Each scores an explanation and
its control (another feature's explanation) on the same examples; yes/no answers are read
from next-token log-probabilities, never parsed from text."""

from __future__ import annotations

import random
from typing import Protocol

import numpy as np

from workers.explain.examples import FeatureExamples, Window
from workers.explain.metrics import auroc, balanced_accuracy, correlation
from workers.explain.prompts import activating, marked, prompt
from workers.explain.run import Score

Messages = list[dict[str, str]]


class YesNo(Protocol):
    name: str

    def p_yes(self, prompts: list[Messages]) -> list[float]: ...


def draw(ex: FeatureExamples, n: int, rng: random.Random) -> tuple[list[Window], list[Window],
                                                                    str]:
    """Up to n activating examples spread across the quantile groups (the top examples where
    there are none), as many non-activating ones from the group `zero`, and where those came
    from: `zero`, or `low-quantile` where the database has no zero group (harvested before it
    existed): then the lowest range's examples stand in and the positives come from the top."""
    def spread(pool: list[Window], k: int) -> list[Window]:
        k = min(k, len(pool))
        return [pool[(i * len(pool)) // k] for i in range(k)]

    if ex.zero:
        pos = spread(ex.quantiles or ex.top, n)
        return pos, rng.sample(ex.zero, min(len(pos), len(ex.zero))), "zero"
    low = ex.quantiles[-n:]
    return spread(ex.top, len(low)), low, "low-quantile"


def text(w: Window) -> str:
    """An excerpt as scorers show it: quoted, whitespace escaped."""
    return repr("".join(w.tokens))


def _binary(value: list[float], control: list[float] | None, labels: list[bool],
            details: dict) -> Score:
    """AUROC of P(yes) for the explanation and its control, with balanced accuracies."""
    details = {**details, "balanced_accuracy": balanced_accuracy(np.array(value) > 0.5, labels),
               "n_positive": sum(labels), "n_negative": len(labels) - sum(labels)}
    c = None
    if control is not None:
        c = auroc(control, labels)
        details["control_balanced_accuracy"] = balanced_accuracy(np.array(control) > 0.5, labels)
    return Score(auroc(value, labels), c, details)


class _YesNoScorer:
    """What detection and fuzzing share: items per feature, P(yes) for the explanation and the
    control on every item in one batch, then AUROC."""

    name = ""
    version = ""

    def __init__(self, backend: YesNo, *, n_examples: int = 5, seed: int = 0):
        self.backend, self.n, self.seed = backend, n_examples, seed
        self.model = backend.name

    def items(self, ex: FeatureExamples, rng: random.Random) -> tuple[list[str], list[bool],
                                                                      dict]:
        raise NotImplementedError

    def score(self, items: list[tuple[str, str | None, FeatureExamples]]) -> list[Score]:
        p = prompt(self.version)
        built, messages = [], []
        for expl, control, ex in items:
            texts, labels, details = self.items(ex, random.Random(self.seed * 7919 + ex.index))
            built.append((labels, details, control is not None))
            for e in (expl, control) if control is not None else (expl,):
                messages += [p.messages(explanation=e, text=t) for t in texts]
        answers = iter(self.backend.p_yes(messages))
        out = []
        for labels, details, has_control in built:
            value = [next(answers) for _ in labels]
            control = [next(answers) for _ in labels] if has_control else None
            out.append(_binary(value, control, labels,
                               {**details, "prompt_version": self.version}))
        return out


class Detection(_YesNoScorer):
    name, version = "detection", "detection-v1"

    def items(self, ex, rng):
        pos, neg, negatives = draw(ex, self.n, rng)
        return ([text(w) for w in pos + neg], [True] * len(pos) + [False] * len(neg),
                {"negatives": negatives})


class Fuzzing(_YesNoScorer):
    """Activating examples shown twice: with the activating tokens marked (true), and with as
    many other tokens marked (wrong)."""

    name, version = "fuzzing", "fuzzing-v1"

    def items(self, ex, rng):
        pos, _, _ = draw(ex, self.n, rng)
        top = max((max(w.acts) for w in pos), default=0.0)
        true_texts, wrong_texts = [], []
        for w in pos:
            mask = activating(w, top)
            others = [i for i, m in enumerate(mask) if not m]
            wrong = set(rng.sample(others, min(len(others), max(sum(mask), 1))))
            true_texts.append(repr(marked(w.tokens, mask)))
            wrong_texts.append(repr(marked(w.tokens, [i in wrong for i in range(len(mask))])))
        n = len(pos)
        return true_texts + wrong_texts, [True] * n + [False] * n, {}


class Simulation:
    """OpenAI's all-at-once simulator: the explanation in the prompt, then every token of an
    excerpt on its own line followed by a tab and a placeholder; the log-probabilities of the
    digits 0-9 after each tab give the expected activation; the score is its correlation with
    the true activations over all tokens of all examples (`ev_correlation_score`). Needs
    log-probabilities at every position: the local backend only."""

    name, version = "simulation", "simulation-v1"
    PLACEHOLDER = "unknown"

    def __init__(self, lm, *, n_examples: int = 5, seed: int = 0):
        self.lm, self.n, self.seed = lm, n_examples, seed
        self.model = lm.name
        self.digits = lm.token_ids([str(d) for d in range(10)])
        self.tab = lm.token_ids(["\t"])[0]
        self.filler = lm.tok(self.PLACEHOLDER + "\n", add_special_tokens=False)["input_ids"]

    def _sequence(self, explanation: str, w: Window) -> tuple[list[int], list[int]]:
        ids = self.lm._ids(prompt(self.version).messages(explanation=explanation))
        positions = []
        for tok in w.tokens:
            ids += self.lm.tok(repr(tok)[1:-1] or " ", add_special_tokens=False)["input_ids"]
            ids.append(self.tab)
            positions.append(len(ids) - 1)
            ids += self.filler
        return ids, positions

    def expected(self, explanation: str, windows: list[Window]) -> list[np.ndarray]:
        """The expected 0-9 activation of every token of each window."""
        seqs = [self._sequence(explanation, w) for w in windows]
        lps = self.lm.logprobs_at([s for s, _ in seqs], [p for _, p in seqs], self.digits)
        return [(lp.softmax(-1).numpy() * np.arange(10)).sum(-1) for lp in lps]

    def score(self, items: list[tuple[str, str | None, FeatureExamples]]) -> list[Score]:
        out = []
        for expl, control, ex in items:
            pos, neg, negatives = draw(ex, self.n, random.Random(self.seed * 7919 + ex.index))
            windows = pos + neg
            true = np.concatenate([w.acts for w in windows])
            value = correlation(np.concatenate(self.expected(expl, windows)), true)
            c = (None if control is None
                 else correlation(np.concatenate(self.expected(control, windows)), true))
            out.append(Score(value, c, {"n_examples": len(windows), "n_tokens": len(true),
                                        "negatives": negatives, "scale": "0-9",
                                        "prompt_version": self.version}))
        return out
