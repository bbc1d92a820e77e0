"""Types the JSON contract's request bodies and answers share (`app.schemas` and the schema
modules beside it): `In`, a request body whose every text is `plain_text`, `NpIn`, one in
Neuronpedia's shape, and `UtcTime`."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, field_validator


def plain_text(value: str) -> str:
    """A text that can be stored and tokenized: no NUL, no lone surrogate (JSON can spell
    both; neither the databases nor the tokenizers take them)."""
    if "\x00" in value:
        raise ValueError("text with a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text with a lone surrogate (not valid Unicode)") from None
    return value


def _plain(value):
    if isinstance(value, str):
        return plain_text(value)
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


class In(BaseModel):
    """A request body: no unknown keys, and every text in it `plain_text`."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _plain_texts(cls, value):
        return _plain(value)


class NpIn(In):
    """A body in Neuronpedia's shape: keys its client sends that this server has no use for
    are ignored, not refused."""

    model_config = ConfigDict(extra="ignore")


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


UtcTime = Annotated[dt.datetime, AfterValidator(_utc)]
"""A time with its zone (stored in UTC; SQLite gives it back without one)."""
