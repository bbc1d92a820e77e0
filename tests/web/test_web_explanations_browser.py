"""Explanations in headless Chromium against a real server: the feature page shows them (an
explanation made of HTML and script as plain text that runs nothing), the search page finds
them, the source table filters by them; all without a console error."""

from __future__ import annotations

import pytest
from explanation_data import SCRIPT, write_explanations
from support import recording_page, serve_in_thread

from app import embedding
from app.config import Settings
from app.main import create_app

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def explained_server(write_db, tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('explained-browser') / 'featurescope.db'}"
    db = write_db(url, slice(0, 1))
    write_explanations(db.engine, db.llama)
    if embedding.available() is None:
        embedding.store_missing_vectors(db.engine)
    app = create_app(Settings(database_url=url), engine=db.engine)
    with serve_in_thread(app) as base:
        yield base, db.llama
    db.engine.dispose()


@pytest.fixture
def page(browser, explained_server):
    ctx, p = recording_page(browser, explained_server[0],
                            viewport={"width": 1360, "height": 900})
    yield p
    ctx.close()


def test_feature_page_shows_explanations_best_first_and_scripts_as_text(page, explained_server,
                                                                       artifacts):
    _, model = explained_server
    page.goto(f"/{model}/1-mlp/3")
    texts = page.locator("#explanations .expl-text").all_inner_texts()
    assert texts == ["closing parenthesis at the end of a call", "python function definitions"]
    flags = page.locator("#explanations .score.uninformative .flag")
    assert flags.count() == 2 and flags.first.is_visible()
    assert "uninformative here" in flags.first.inner_text()
    title = page.locator("#explanations .score.uninformative").first.get_attribute("title")
    assert "do not beat their controls" in title
    page.screenshot(path=str(artifacts / "feature-explanations.png"))
    page.goto(f"/{model}/1-mlp/5")
    assert page.locator("#explanations .expl-text").inner_text() == SCRIPT
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#explanations b").count() == 0
    assert page.problems == []


def test_search_page_finds_the_feature_and_leads_to_it(page, explained_server, artifacts):
    _, model = explained_server
    page.goto("/search/explanations")
    page.fill("#q", "closing parenthesis")
    page.select_option("#model", model)
    with page.expect_navigation():
        page.click("form.search-form button[type=submit]")
    assert "q=closing+parenthesis" in page.url
    first = page.locator("#explanation-results tbody tr").first
    assert first.locator(".expl-cell").inner_text() == "closing parenthesis at the end of a call"
    page.screenshot(path=str(artifacts / "explanation-search.png"))
    with page.expect_navigation():
        first.locator("a").click()
    assert page.url.endswith(f"/{model}/1-mlp/3")
    assert page.locator("#explanations .expl.best .expl-text").inner_text().startswith("closing")
    page.goto("/search/explanations?q=bold+quotes")
    assert SCRIPT in page.locator("#explanation-results").inner_text()
    assert page.evaluate("window.__pwned") is None
    assert page.problems == []


def test_source_table_filters_by_explanation(page, explained_server):
    _, model = explained_server
    page.goto(f"/{model}/1-mlp")
    page.fill("#filter input[name=q]", "female names")
    with page.expect_navigation():
        page.click("#filter button[type=submit]")
    rows = page.locator("table.features tbody tr")
    assert rows.count() == 2
    assert all(t.startswith("female names") for t in
               page.locator("table.features tbody td.expl-cell").all_inner_texts())
    assert page.locator("#filter input[name=q]").input_value() == "female names"
    assert page.problems == []
