"""One Settings object, read from the environment (prefix FEATURESCOPE_)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_DATASET = "pydoc"


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

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is not None and not v.split(":", 1)[0].startswith(("sqlite", "postgresql")):
            raise ValueError(f"FEATURESCOPE_DATABASE_URL must be sqlite or postgresql, got {v!r}")
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


def normalize_db_url(url: str) -> str:
    """Accept the usual spellings of a PostgreSQL URL and use the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url
