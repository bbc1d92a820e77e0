"""The JSON of a head page (`/{model}/{L}-attn/{head}`): a feature page with the head's metrics."""

from __future__ import annotations

from pydantic import Field

from app.schemas import ExampleOut, FeaturePage, Out


class HeadMetric(Out):
    name: str = Field(description="induction, previous-token, duplicate-token, self, bos-sink, "
                      "distance, entropy or copying")
    value: float
    control: float = Field(description="the same metric of uniform causal attention (copying: "
                           "0, a head with no preference between copying and suppressing)")


class DistanceBin(Out):
    lo: int = Field(description="smallest query - key distance of the bin")
    hi: int | None = Field(description="largest distance of the bin; null: no end")
    mass: float = Field(description="fraction of the head's attention at these distances")


class HeadExample(ExampleOut):
    """A top example of a head: acts are the attention row of its peak query (`peak_pos`)."""

    bos_weight: float | None = Field(description="attention from the peak query to the BOS key")
    key_pos: int | None = Field(description="position of the key the peak query attends to most "
                                "(the BOS key excluded)")
    rows: list[list[float]] | None = Field(None, description="for the first top examples: per "
                                           "window token, its own attention row over the "
                                           "window's keys (float16, as acts)")


class HeadInfo(Out):
    head: int
    metrics: list[HeadMetric]
    distance: list[DistanceBin] = Field(description="attention by distance, up to the last bin "
                                        "that holds any")


class HeadPage(FeaturePage):
    top: list[HeadExample]
    head: HeadInfo

