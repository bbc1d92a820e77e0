"""The prompts of explainers and scorers, read from versioned files in prompts/ (package data),
and the marking of activating tokens in the excerpts they show."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

from workers.explain.examples import Window

SPLIT = "=== user ==="
MARK_FRACTION = 0.3
"""A token is marked as activating when its activation is at least this fraction of the
feature's highest activation among the examples shown."""


@dataclass(frozen=True)
class Prompt:
    """A system message and a user template with {named} fields; `version` is the file's
    stem (for example `explain-v1`), recorded with everything it produced."""

    version: str
    system: str
    user: str

    def messages(self, **fields: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system.format(**fields)},
                {"role": "user", "content": self.user.format(**fields)}]


@cache
def prompt(version: str) -> Prompt:
    """The prompt of file prompts/{version}.txt."""
    path = resources.files("workers.explain") / "prompts" / f"{version}.txt"
    if not path.is_file():
        raise ValueError(f"no prompt {version!r}")
    system, sep, user = path.read_text(encoding="utf-8").partition(SPLIT)
    if not sep:
        raise ValueError(f"prompt {version!r} has no {SPLIT!r} line")
    return Prompt(version, system.strip(), user.strip())


def marked(tokens: list[str], mask: list[bool]) -> str:
    """The text of the tokens with each run of masked tokens wrapped in << >>."""
    out, inside = [], False
    for tok, m in zip(tokens, mask, strict=True):
        if m and not inside:
            out.append("<<")
        elif not m and inside:
            out.append(">>")
        inside = m
        out.append(tok)
    if inside:
        out.append(">>")
    return "".join(out)


def activating(window: Window, top: float) -> list[bool]:
    """Which tokens of a window count as activating: at least MARK_FRACTION of `top` (> 0)."""
    return [top > 0 and a >= MARK_FRACTION * top for a in window.acts]


def excerpts(windows: list[Window]) -> str:
    """Numbered excerpts with their activating tokens marked, one per line."""
    top = max((max(w.acts, default=0.0) for w in windows), default=0.0)
    return "\n".join(f"{i + 1}. {marked(w.tokens, activating(w, top))!r}"
                     for i, w in enumerate(windows))
