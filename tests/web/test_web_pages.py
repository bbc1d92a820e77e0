"""The HTML pages, as the server renders them: templates and their context, htmx fragments,
links, escaping of untrusted corpus text, security headers."""

from __future__ import annotations

import html
import re
import struct
from pathlib import Path

from support import skip_or_fail

from app.routes.present import alpha, cells, half, shown, single
from app.schemas import FeaturePage, HomePage, ModelPage, SourcePage

STATIC = Path(__file__).resolve().parents[2] / "static"


def page(client, url, headers=None):
    r = client.get(url, headers=headers or {})
    assert r.status_code == 200, (url, r.text[:300])
    assert r.headers["content-type"].startswith("text/html")
    return r


def test_each_page_renders_its_template_with_its_context(client, web_db):
    m, s = web_db.llama, "1-mlp"
    for url, template, schema in (("/", "home.html", HomePage), (f"/{m}", "model.html", ModelPage),
                                  (f"/{m}/{s}", "source.html", SourcePage),
                                  (f"/{m}/{s}/2", "feature.html", FeaturePage)):
        r = page(client, url)
        assert r.template.name == template
        ctx = r.context["ctx"]
        assert isinstance(ctx, schema)
        # the JSON twin is the same context object
        assert ctx.model_dump(mode="json") == client.get(_json(url)).json()
        alt = re.search(r'<link rel="alternate" type="application/json" href="([^"]+)">', r.text)
        assert alt and html.unescape(alt.group(1)) == _json(url)


def _json(url: str) -> str:
    path, _, query = url.partition("?")
    return path + ".json" + (f"?{query}" if query else "")


def test_htmx_requests_get_the_partial_alone(client, web_db):
    m = web_db.llama
    for url, partial in (("/", "_models.html"), (f"/{m}", "_sources.html"),
                         (f"/{m}/1-mlp?sort=max_act", "_features.html"),
                         (f"/{m}/1-mlp/2", "_feature.html")):
        r = page(client, url, {"HX-Request": "true"})
        assert r.template.name == partial
        assert "<html" not in r.text and "<body" not in r.text
        assert r.headers["vary"] == "HX-Request"
        # a history restore wants the whole page again
        full = page(client, url, {"HX-Request": "true", "HX-History-Restore-Request": "true"})
        assert "<html" in full.text


RELOAD = '<noscript><meta http-equiv="refresh" content="5"></noscript>'


def test_building_sources_poll_their_own_fragment(client, web_db):
    home = page(client, "/").text
    assert re.search(r'<div id="models" hx-get="/" hx-trigger="load delay:2s"', home)
    assert "harvesting" in home and "<progress" in home
    assert RELOAD in home  # without JavaScript the page reloads itself
    src = page(client, f"/{web_db.llama}/0-res-sae-32").text
    assert f'hx-get="/{web_db.llama}/0-res-sae-32"' in src and "being harvested" in src
    assert RELOAD in src and RELOAD in page(client, f"/{web_db.llama}").text
    model = page(client, f"/{web_db.gpt2}").text  # nothing building there
    assert "hx-trigger" not in model and "refresh" not in model
    assert "refresh" not in page(client, f"/{web_db.llama}/1-mlp").text


def test_feature_page_header_and_sections(client, web_db):
    r = page(client, f"/{web_db.llama}/1-mlp/5")
    ctx: FeaturePage = r.context["ctx"]
    text = r.text
    for needle in (web_db.llama, "1-mlp", "blocks.1.mlp.hook_post", "Top activations",
                   "Bottom activations", "Across the activation range", "Activation histogram",
                   "Promoted tokens", "Suppressed tokens", 'id="prev"', 'id="next"',
                   'id="random"', 'id="copy"', single(ctx.stats.max_act)):
        assert needle in text, needle
    assert text.count('class="ex"') == (len(ctx.top) + sum(len(g.examples) for g in ctx.quantiles)
                                        + sum(e.peak_value < 0 for e in ctx.bottom))
    assert text.count("<rect ") > 3  # the histogram
    assert 'href="/api/v1/random/' in text and 'rel="canonical"' in text


def test_tokens_carry_their_exact_value_and_an_intensity_class(client, web_db):
    r = page(client, f"/{web_db.llama}/1-mlp/5")
    ctx: FeaturePage = r.context["ctx"]
    ex = ctx.top[0]
    spans = re.findall(r'<div class="toks">(.*?)</div>', r.text)[0]
    got = re.findall(r'<span class="([^"]*)"(?: title="([^"]*)")?>(.*?)</span>', spans)
    assert len(got) == len(ex.tokens)
    for i, (cls, title, text) in enumerate(got):
        value = ex.peak_value if i == ex.peak_index else ex.acts[i]
        if value == 0:  # no title, no highlight: the tooltip reads 0
            assert (cls, title) == ("t", "") and html.unescape(text) == shown(ex.tokens[i])
            continue
        assert html.unescape(title) == (single(value) if i == ex.peak_index else half(value))
        fmt = "<f" if i == ex.peak_index else "<e"  # the shortest text of the exact value
        assert struct.pack(fmt, float(html.unescape(title))) == struct.pack(fmt, value)
        assert html.unescape(text) == shown(ex.tokens[i])
        if "bos" in cls:
            continue
        k = re.search(r"\ba(\d+)\b", cls)
        assert (int(k.group(1)) / 100 if k else 0.0) == alpha(value, ctx.stats)
        assert ("n" in cls.split()) == (value < 0)
        assert ("pk" in cls.split()) == (i == ex.peak_index)


def test_visible_whitespace():
    assert shown("\n") == "↵" and shown("\t") == "⇥" and shown("a\r\n") == "a␍↵"
    assert shown(" the") == " the" and shown("") == "∅" and shown("\x00") == "␀"
    assert shown("\u200b") == "⟨U+200B⟩"


def test_corpus_html_is_escaped_text(client, web_db):
    """Pages of a corpus full of markup: every payload is escaped, none is live markup."""
    payload_pieces = ["<script>", "onerror=", "</textarea>", "{{ 7 * 7 }}", "javascript:"]
    seen = set()
    for index in range(0, 256, 9):
        r = page(client, f"/{web_db.gpt2}/0-mlp/{index}")
        ctx: FeaturePage = r.context["ctx"]
        body = r.text
        assert "<script>window" not in body and "<img" not in body and "<svg onload" not in body
        assert "</textarea><script>" not in body and "</title></style>" not in body
        scripts = re.findall(r"<script[^>]*>", body)
        assert all(re.fullmatch(r'<script src="/static/[^"]+" defer>', s) for s in scripts)
        joined = "".join(t for e in ctx.top for t in e.tokens)
        seen |= {p for p in payload_pieces if p in joined}
        assert "&lt;" in body
    assert len(seen) >= 3, seen


def test_security_headers(client, web_db):
    r = client.get(f"/{web_db.gpt2}/0-mlp/1")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "unsafe" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"


def test_source_page_has_sort_links_jump_box_and_metrics(client, web_db):
    r = page(client, f"/{web_db.llama}/1-res-sae-48?sort=max_act")
    text = r.text
    assert 'name="jump"' in text and 'method="get"' in text
    assert "sort=frac_active" in text and "order=asc" in text  # toggles the active column
    assert "81.2%" in text and "93.4%" in text and "11.5" in text  # SAE metrics
    rows = r.context["ctx"].features
    assert [f.max_act for f in rows] == sorted((f.max_act for f in rows), reverse=True)
    assert 'hx-push-url="true"' in text


def test_cells_scale_negative_values_by_the_minimum(client, web_db):
    ctx = FeaturePage.model_validate(client.get(f"/{web_db.llama}/1-mlp/5.json").json())
    neg = next(e for e in ctx.bottom if e.peak_value < 0)
    out = cells(neg, ctx.stats, ctx.bos_first)
    assert "n" in out[neg.peak_index][2].split() and "pk" in out[neg.peak_index][2].split()
    assert alpha(ctx.stats.min_act, ctx.stats) == 1.0 and alpha(ctx.stats.max_act, ctx.stats) == 1.0


def test_static_assets_and_vendor(client):
    """The explorer's own CSS and JS, and htmx as static/fetch_vendor.sh vendors it from npm:
    each served byte for byte, htmx from the URL the pages load it from, in the pinned version."""
    for name in ("style.css", "featurescope.js"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.content == (STATIC / name).read_bytes(), name
    vendored = STATIC / "vendor" / "htmx.min.js"
    if not vendored.is_file():
        skip_or_fail("static/vendor/htmx.min.js is missing (static/fetch_vendor.sh installs it)")
    src = re.search(r'<script src="(/static/vendor/htmx\.min\.js[^"]*)" defer>',
                    page(client, "/").text)
    assert src, "the pages do not load the vendored htmx"
    r = client.get(html.unescape(src.group(1)))
    assert r.status_code == 200 and r.content == vendored.read_bytes()
    assert r.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    pinned = re.search(r'HTMX_VERSION:-([0-9.]+)', (STATIC / "fetch_vendor.sh").read_text())
    assert (STATIC / "vendor" / "htmx.version").read_text().strip() == pinned.group(1)
    assert f'version:"{pinned.group(1)}"' in r.text  # the file is that release of htmx


def test_histogram_plot_spans_the_used_bins():
    from app.histogram import HIST_BINS, histogram_edges
    from app.routes.present import hist_plot
    from app.schemas import Histogram

    edges = [e if e != float("inf") else None for e in histogram_edges()]
    counts = [0] * HIST_BINS
    assert hist_plot(Histogram(edges=edges, counts=counts)) is None
    counts[0], counts[41], counts[45], counts[HIST_BINS - 1] = 100, 3, 6, 1
    plot = hist_plot(Histogram(edges=edges, counts=counts))
    assert [b.count for b in plot.bars if b.count] == [3, 6, 1]
    assert len(plot.bars) == HIST_BINS - 41  # bins 41 to the last
    assert plot.bars[0].x == 0 and plot.bars[-1].hi is None
    assert abs(plot.bars[-1].x + plot.bars[-1].w - plot.width) < 0.05
    assert max(b.h for b in plot.bars) == plot.height and plot.ymax == 6
    assert (plot.low_count, plot.total) == (100, 110)
    assert all(0 <= x <= plot.width for x, _ in plot.ticks) and plot.ticks


def test_docs_is_a_page_of_our_own_that_needs_no_cdn(client):
    r = page(client, "/docs")
    assert r.template.name == "docs.html"
    assert "cdn" not in r.text.lower() and "<script>" not in r.text
    for needle in ("/{model}/{source}/{index}.json", "/api/feature/{model}/{source}/{index}",
                   "FeaturePage", "ErrorOut", "peak_index", "frac_active"):
        assert needle in html.unescape(r.text), needle
