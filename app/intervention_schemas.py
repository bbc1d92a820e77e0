"""The JSON contract of the interventions (steer, ablate, patch), their pages and Neuronpedia's
steer endpoint: requests with their limits, answers, and the contexts of the pages."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from app.model_queue import MAX_TEXT_CHARS
from app.schema_types import In, NpIn
from app.schemas import Out, TokenRef

MAX_NEW_TOKENS = 256
"""Tokens one steering request may generate (each of default and steered)."""
MAX_FEATURES = 16
"""Features one steering or ablation request may name."""
MAX_PATCH_RUNS = 4096
"""Patched runs one sweep may need (layers x (positions + heads + 1) for all kinds; 413 over)."""
DEFAULT_PROMPT = "Once upon a time,"
IOI = {"clean": "When John and Mary went to the store, John gave the bag to",
       "corrupted": "When John and Mary went to the store, Mary gave the bag to",
       "answer": " Mary", "wrong": " John"}
"""The indirect-object example the patch page opens with."""
PATCH_KINDS = ("resid", "heads", "mlp")

ModelSlug = Annotated[str, Field(max_length=128, examples=["smollm2-135m-instruct"])]
SourceSlug = Annotated[str, Field(max_length=128, examples=["6-mlp"])]
Index = Annotated[int, Field(ge=0, le=2**31 - 1)]


# ------------------------------------------------------------------ steering


class SteerFeatureIn(In):
    source: SourceSlug
    index: Index
    strength: float = Field(allow_inf_nan=False, ge=-1e6, le=1e6,
                            description="in units of the feature's direction")


class SteerIn(In):
    """Generate after `prompt` without and with the features steered, from the same seed."""

    model: ModelSlug
    prompt: str = Field(max_length=MAX_TEXT_CHARS, description="tokenized like the corpus: "
                        "BOS first when the model has one")
    features: list[SteerFeatureIn] = Field(default_factory=list, max_length=MAX_FEATURES)
    method: Literal["additive", "orthogonal", "cap"] = Field(
        "additive", description="additive: x + s v; orthogonal: x's component along v replaced "
        "by s v; cap: that component limited to s v")
    normalize: bool = Field(False, description="scale each direction v to unit norm first")
    n_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.5, ge=0, le=10, allow_inf_nan=False,
                               description="0: greedy (the most likely token)")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    top_logprobs: int = Field(5, ge=0, le=20, description="alternatives listed per token")
    freq_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False, description=(
        "subtracted from a token's logit per time it occurs so far, before sampling"))


class TokenLogprob(Out):
    id: int
    token: str
    logprob: float


class GeneratedToken(TokenLogprob):
    top: list[TokenLogprob] = Field(description="the most likely tokens at this step")


class Continuation(Out):
    text: str = Field(description="the generated tokens, decoded")
    tokens: list[GeneratedToken]


class SteeredFeature(Out):
    source: str
    index: int
    strength: float
    hook_name: str


class SteerOut(Out):
    ok: Literal[True] = True
    model: str
    prompt: str
    prompt_tokens: list[str]
    prompt_ids: list[int]
    features: list[SteeredFeature]
    method: str
    normalize: bool
    temperature: float
    seed: int
    default: Continuation
    steered: Continuation
    url: str = Field(description="the steer page of this request")


class RunView(Out):
    """A page that holds a request (its URL's, else a default one) and runs it only on a POST;
    after one, its result or its error."""

    ok: Literal[True] = True
    error: str | None = None
    url: str = Field(description="the page of this request")
    api: str = Field(description="where to POST the request as JSON")
    live: bool = Field(description="whether this server runs models (serve --live)")
    models: list[str] = Field(description="the models it can run")


class SteerView(RunView):
    request: SteerIn
    result: SteerOut | None = Field(None, description="after a run (a POST) only")


class NpSteerFeatureIn(NpIn):
    modelId: ModelSlug
    layer: SourceSlug
    index: Index
    strength: float = Field(allow_inf_nan=False, ge=-1e6, le=1e6)


class NpSteerIn(NpIn):
    """The body of Neuronpedia's POST /api/steer."""

    prompt: str = Field(max_length=MAX_TEXT_CHARS)
    modelId: ModelSlug
    features: list[NpSteerFeatureIn] = Field(max_length=MAX_FEATURES)
    temperature: float = Field(ge=0, le=10, allow_inf_nan=False)
    n_tokens: int = Field(ge=1, le=MAX_NEW_TOKENS)
    freq_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    seed: int = Field(16, ge=-100_000_000, le=100_000_000)
    strength_multiplier: float = Field(1.0, ge=0, le=1e6, allow_inf_nan=False)
    steer_method: Literal["SIMPLE_ADDITIVE", "ORTHOGONAL_DECOMP"] = "SIMPLE_ADDITIVE"
    normalize_steering: bool = False
    n_logprobs: int = Field(5, ge=0, le=20)
    stream: bool = False


class NpTopLogprob(Out):
    token: str
    logprob: float


class NpLogprob(Out):
    token: str
    logprob: float
    topLogprobs: list[NpTopLogprob] | None


class NpSteerOut(Out):
    """Neuronpedia's answer: each text is the prompt followed by what was generated."""

    STEERED: str
    DEFAULT: str
    steeredLogProbs: list[NpLogprob] | None
    defaultLogProbs: list[NpLogprob] | None
    id: str | None = None
    shareUrl: str | None
    limit: str | None = None


# ------------------------------------------------------------------ ablation


class AblateFeatureIn(In):
    source: SourceSlug
    index: Index


class AblateIn(In):
    """The next-token loss of a text with features ablated: give `text` or `tokens`."""

    model: ModelSlug
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS,
                             description="tokenized like the corpus: BOS first")
    tokens: list[int] | None = Field(None, description="token ids, run exactly as given")
    features: list[AblateFeatureIn] = Field(min_length=1, max_length=MAX_FEATURES)
    mode: Literal["zero", "mean", "value"] = Field(
        "zero", description="replace each activation by 0, by the feature's mean over the "
        "harvest, or by `value`")
    value: float | None = Field(None, allow_inf_nan=False)
    top: int = Field(5, ge=0, le=20, description="moved tokens listed per position")


class MovedToken(Out):
    id: int
    token: str
    clean: float = Field(description="its log-probability in the clean run")
    ablated: float
    delta: float = Field(description="ablated - clean")


class AblatedFeature(Out):
    source: str
    index: int
    hook_name: str
    replacement: float = Field(description="the value its activation was replaced by")


class AblateOut(Out):
    """Per token i: the loss of predicting token i from the tokens before it (null for the
    first token), clean and ablated, and the tokens whose log-probability moved most there."""

    ok: Literal[True] = True
    model: str
    mode: str
    features: list[AblatedFeature]
    tokens: list[str]
    token_ids: list[int]
    loss_clean: list[float | None]
    loss_ablated: list[float | None]
    delta: list[float | None] = Field(description="loss_ablated - loss_clean")
    moved: list[list[MovedToken]] = Field(description="by |delta|, largest first")
    mean_loss_clean: float
    mean_loss_ablated: float


class EffectText(Out):
    """One text of a feature page's effect box: its shown tokens with the rise of their loss."""

    label: str
    tokens: list[str]
    delta: list[float | None]
    loss_clean: list[float | None]
    loss_ablated: list[float | None]
    mean_delta: float


class EffectView(Out):
    mode: str
    replacement: float
    texts: list[EffectText]
    scale: float = Field(description="the largest |delta| shown: full colour")


# ------------------------------------------------------------------ patching


class PatchIn(In):
    """A clean and a corrupted prompt of the same token length, and the answer token of the
    clean one against a wrong one (each one token, e.g. " Mary" and " John")."""

    model: ModelSlug
    clean: str = Field(max_length=MAX_TEXT_CHARS)
    corrupted: str = Field(max_length=MAX_TEXT_CHARS)
    answer: str = Field(max_length=200)
    wrong: str = Field(max_length=200)
    kinds: list[Literal["resid", "heads", "mlp"]] = Field(
        default_factory=lambda: list(PATCH_KINDS), min_length=1, max_length=3)


class PatchOut(Out):
    """Normalised logit differences (0 = the corrupted run, 1 = the clean run) of each patch."""

    ok: Literal[True] = True
    model: str
    clean_tokens: list[str]
    corrupted_tokens: list[str]
    clean_ids: list[int]
    corrupted_ids: list[int]
    answer: TokenRef
    wrong: TokenRef
    logit_diff_clean: float = Field(description="logit(answer) - logit(wrong), clean run")
    logit_diff_corrupted: float
    first_diff: int = Field(description="the first position where the prompts differ; "
                            "residual patches before it change nothing and are not run")
    resid: list[list[float]] | None = Field(description="[layer][position]: the residual "
                                            "stream entering the block, at one position")
    heads: list[list[float]] | None = Field(description="[layer][head]: one head's output, at "
                                            "every position")
    mlp: list[float] | None = Field(description="[layer]: the MLP's output, at every position")
    runs: int = Field(description="patched runs computed")
    passes: int = Field(description="batched forward passes made")
    url: str = Field(description="the patch page of this request")


class PatchView(RunView):
    request: PatchIn = Field(description="the indirect-object example when the URL names none")
    result: PatchOut | None = Field(None, description="after a run (a POST) only")
