"""What inference on the loaded models refuses, and the HTTP status each refusal answers.

Torch-free: the model queue (`app.model_queue`) and the loaded models (`workers.inference`)
raise these, and one exception handler (`app.routes.errors`) answers each with the JSON envelope
or the error page; pages that show an error in place catch them instead.
"""

from __future__ import annotations

SERVED_WHEN = ("harvested sources are served live when their model and SAE files load as they "
               "were harvested")


class InferenceError(Exception):
    """A request the loaded models cannot answer. `str(exc)` says why, to the user."""

    status = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = dict(headers or {})


class InferenceOff(InferenceError):
    """The server runs without loaded models."""

    status = 503

    def __init__(self) -> None:
        super().__init__("live inference is off on this server: start it with "
                         "`featurescope serve --live` to run your own text through the model")


class NotLoaded(InferenceError):
    """A model, or a source of a model, that is not loaded (harvested but not served live)."""

    status = 503

    @classmethod
    def model(cls, model: str, loaded: list[str]) -> NotLoaded:
        return cls(f"model {model!r} is not loaded for live inference; loaded: "
                   f"{', '.join(sorted(loaded)) or 'none'} ({SERVED_WHEN})")

    @classmethod
    def source(cls, model: str, source: str, loaded: list[str]) -> NotLoaded:
        return cls(f"{model} has no live source {source!r}; live sources: "
                   f"{', '.join(sorted(loaded)) or 'none'} ({SERVED_WHEN})")


class Busy(InferenceError):
    """The queue in front of the models is longer than a request may wait (with Retry-After)."""

    status = 503


class TooLong(InferenceError):
    """A text, or a batch of texts, over the server's limits."""

    status = 413


class BadInput(InferenceError):
    """A text or token ids the model cannot take (empty, out of its vocabulary, ...)."""

    status = 422
