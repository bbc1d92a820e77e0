"""The explorer in headless Chromium (Debian's, driven by Playwright) against a real server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.routes.present import alpha, single
from app.schemas import FeaturePage

HTMX = Path(__file__).resolve().parents[2] / "static" / "vendor" / "htmx.min.js"

pytestmark = pytest.mark.browser


@pytest.fixture
def new_page(browser, live_server):
    """Pages that record console errors (CSP violations included) and dialogs."""
    contexts = []

    def make(scheme: str = "light"):
        ctx = browser.new_context(color_scheme=scheme, viewport={"width": 1360, "height": 900},
                                  base_url=live_server)
        ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_server)
        contexts.append(ctx)
        page = ctx.new_page()
        page.problems = []
        page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
        page.on("pageerror", lambda e: page.problems.append(str(e)))
        page.on("dialog", lambda d: (page.problems.append(f"dialog: {d.message}"), d.dismiss()))
        return page

    yield make
    for ctx in contexts:
        ctx.close()


def rgba(css: str) -> tuple[tuple[int, int, int], float]:
    nums = [float(x) for x in re.findall(r"[\d.]+", css)]
    return tuple(int(x) for x in nums[:3]), (nums[3] if len(nums) > 3 else 1.0)


def feature_json(client, url: str) -> FeaturePage:
    return FeaturePage.model_validate(client.get(url + ".json").json())


def test_highlights_follow_the_stored_values(new_page, client, web_db):
    url = f"/{web_db.llama}/1-mlp/5"
    ctx = feature_json(client, url)
    page = new_page()
    page.goto(url)
    colours = page.eval_on_selector_all(
        ".examples .ex .toks", "els => els.map(e => [...e.children].map("
        "s => [getComputedStyle(s).backgroundColor, s.className]))")
    examples = ctx.top + [e for e in ctx.bottom if e.peak_value < 0] + [
        e for g in ctx.quantiles for e in g.examples]
    assert len(colours) == len(examples)
    hues = {}
    for ex, spans in zip(examples, colours, strict=True):
        assert len(spans) == len(ex.acts)
        for i, (css, cls) in enumerate(spans):
            value = ex.peak_value if i == ex.peak_index else ex.acts[i]
            rgb, a = rgba(css)
            expected = 0.0 if "bos" in cls.split() else alpha(value, ctx.stats)
            assert a == pytest.approx(expected, abs=0.006), (i, value, css)
            if expected:
                hues.setdefault(value > 0, set()).add(rgb)
    assert len(hues[True]) == 1 and len(hues[False]) == 1 and hues[True] != hues[False]
    assert page.problems == []


def test_hovering_a_token_shows_it_and_its_exact_value(new_page, client, web_db):
    url = f"/{web_db.llama}/1-mlp/5"
    ctx = feature_json(client, url)
    page = new_page()
    page.goto(url)
    peak = page.locator(".examples .ex").first.locator(".t.pk")
    peak.hover()
    tip = page.locator("#tip")
    tip.wait_for(state="visible")
    assert tip.locator(".tip-val").inner_text() == single(ctx.top[0].peak_value)
    token = ctx.top[0].tokens[ctx.top[0].peak_index]
    assert tip.locator(".tip-tok").inner_text() == token.replace(" ", "\u2423")
    page.mouse.move(5, 5)
    tip.wait_for(state="hidden")


def test_keyboard_shortcuts_and_copied_links(new_page, web_db, live_server):
    page = new_page()
    page.goto(f"/{web_db.llama}/1-mlp/5")
    htmx = HTMX.exists()
    if htmx:  # with htmx, prev/next swap the feature in place and push its URL
        assert page.evaluate("typeof htmx") == "object"
        page.evaluate("window.__same_document = true")

    def at(index: int):
        page.locator(f'#feature[data-index="{index}"]').wait_for()
        assert page.url == f"{live_server}/{web_db.llama}/1-mlp/{index}"
        assert page.title().startswith(f"{web_db.llama}/1-mlp/{index} ")
        if htmx:
            assert page.evaluate("window.__same_document") is True

    for key, index in (("ArrowRight", 6), ("j", 7), ("ArrowLeft", 6), ("k", 5)):
        page.keyboard.press(key)
        at(index)
    assert re.search(r"Neuron\s+5", page.locator("h1").first.inner_text())
    page.go_back()
    page.locator('#feature[data-index="6"]').wait_for()
    assert page.url.endswith("/1-mlp/6")

    page.keyboard.press("c")
    page.locator("#copy[data-copied]").wait_for(state="attached")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == f"{live_server}/{web_db.llama}/1-mlp/6"
    heading = page.locator("#feature .facts").inner_text()
    other = new_page()
    other.goto(copied)
    assert other.locator("#feature .facts").inner_text() == heading
    other.reload()
    assert other.locator("#feature").get_attribute("data-index") == "6"

    page.keyboard.press("r")
    page.wait_for_url(re.compile(rf"{re.escape(live_server)}/{web_db.llama}/1-mlp/\d+$"))
    page.locator("#feature").wait_for()
    assert page.problems == [] and other.problems == []


def test_sorted_and_paged_list_is_a_shareable_link(new_page, web_db, live_server):
    page = new_page()
    page.goto(f"/{web_db.llama}/1-mlp?limit=10")
    page.get_by_role("link", name=re.compile("max activation")).click()
    page.wait_for_url(re.compile(r"sort=max_act"))
    page.locator("#next").click()
    page.wait_for_url(re.compile(r"next="))
    first = page.locator("table.features tbody tr td a").first.inner_text()
    state = page.url
    other = new_page()
    other.goto(state)
    assert other.locator("table.features tbody tr td a").first.inner_text() == first
    values = [float(x) for x in other.locator("table.features tbody td:nth-child(2)")
              .all_inner_texts()]
    assert values == sorted(values, reverse=True)
    other.fill("#jump", "17")
    other.press("#jump", "Enter")
    other.wait_for_url(f"{live_server}/{web_db.llama}/1-mlp/17")
    assert page.problems == [] and other.problems == []


def test_payloads_in_the_corpus_render_as_text_and_run_nothing(new_page, client, web_db):
    page = new_page()
    shown_payloads = 0
    for index in range(0, 256, 43):
        url = f"/{web_db.gpt2}/0-mlp/{index}"
        page.goto(url)
        title = page.title()
        assert title.startswith(f"{web_db.gpt2}/0-mlp/{index}")
        state = page.evaluate("""() => ({
            pwned: window.__pwned ?? null,
            scripts: [...document.scripts].map(s => s.getAttribute('src')),
            foreign: document.querySelectorAll('.toks *:not(span.t)').length,
            images: document.images.length,
            svgs: document.querySelectorAll('.examples svg').length,
            text: [...document.querySelectorAll('.examples .toks')].map(e => e.textContent),
        })""")
        assert state["pwned"] is None and state["images"] == 0 and state["svgs"] == 0
        assert state["foreign"] == 0
        assert all(s and s.startswith("/static/") for s in state["scripts"])
        ctx = feature_json(client, url)
        text = "".join(state["text"])
        for ex in ctx.top:
            assert "".join(ex.tokens).replace("\n", "↵").replace("\t", "⇥") in text
        shown_payloads += sum(p in text for p in ("<script>", "onerror=", "</textarea>", "{{"))
    assert shown_payloads >= 3
    assert page.problems == []


def test_screenshots_in_both_themes(new_page, web_db, artifacts):
    backgrounds = {}
    for scheme in ("light", "dark"):
        page = new_page(scheme)
        page.goto(f"/{web_db.llama}/1-mlp/5")
        page.locator(".examples .ex").first.locator(".t.pk").hover()
        page.screenshot(path=str(artifacts / f"feature-{scheme}.png"), full_page=True)
        page.goto(f"/{web_db.llama}/1-res-sae-48?sort=max_act")
        page.screenshot(path=str(artifacts / f"source-{scheme}.png"))
        page.goto("/")
        page.screenshot(path=str(artifacts / f"home-{scheme}.png"))
        page.goto("/docs")
        page.screenshot(path=str(artifacts / f"docs-{scheme}.png"))
        backgrounds[scheme] = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert page.problems == []
    assert sum(rgba(backgrounds["light"])[0]) > 600 > sum(rgba(backgrounds["dark"])[0])
    assert (artifacts / "feature-dark.png").stat().st_size > 10_000


def test_reading_works_without_javascript(browser, live_server, web_db):
    ctx = browser.new_context(java_script_enabled=False, base_url=live_server)
    try:
        page = ctx.new_page()
        page.goto(f"/{web_db.llama}/1-mlp?sort=max_act")
        page.get_by_role("link", name=re.compile("density")).click()
        page.wait_for_url(re.compile("sort=frac_active"))
        page.fill("#jump", "9")
        page.press("#jump", "Enter")
        page.wait_for_url(re.compile(r"/1-mlp/9$"))
        assert page.locator(".examples .ex").count() > 5
        page.locator("#next").click()
        page.wait_for_url(re.compile(r"/1-mlp/10$"))
        assert page.locator("#feature").get_attribute("data-index") == "10"
    finally:
        ctx.close()
