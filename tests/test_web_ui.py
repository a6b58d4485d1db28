"""The web page end to end in a real headless Chromium: upload, see results, click one for more like it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ris.server import create_app, serve_in_thread
from tests.server_fixtures import build_collection, caltech_images

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
RESULTS = "#results .card"
FIRST_THUMBS_LOADED = """() => {
  const imgs = [...document.querySelectorAll('#results .card img')].slice(0, 4);
  return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0);
}"""


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_in_thread(create_app(build_collection(tmp_path_factory.mktemp("ui")))) as url:
        yield url


@pytest.fixture(scope="module")
def page(base_url: str):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):  # .ci/run installs it: a missing browser in CI is a failure, not a skip
            pytest.fail(f"no Chromium at {CHROMIUM}")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base_url)
            yield page
            assert not errors, f"JavaScript errors: {errors}"
        finally:
            browser.close()


def test_upload_then_more_like_this(page, tmp_path: Path) -> None:
    page.wait_for_function("() => /\\d+ images/.test(document.querySelector('#collection-info').textContent)")
    assert page.locator("#sample .card").count() > 0, "the collection's sample is shown"

    query = caltech_images(offset=8, per_category=1)[0]  # an accordion that is not in the collection
    page.set_input_files("#file-input", str(query))
    page.wait_for_selector(RESULTS)
    page.wait_for_function(FIRST_THUMBS_LOADED)
    first = page.locator(RESULTS)
    assert first.count() == 20
    assert page.locator("#query-preview").is_visible()
    assert query.name in page.locator("#results-note").text_content()
    caption = first.nth(0).locator("figcaption").text_content()
    assert "#1" in caption and (".jpg" in caption or ".png" in caption)

    clicked = first.nth(2)
    clicked_id = clicked.get_attribute("data-id")
    clicked.locator("button").click()
    page.wait_for_function("(id) => document.querySelector('#results .card[data-rank=\"1\"]')?.dataset.id === id", arg=clicked_id)
    page.wait_for_function(FIRST_THUMBS_LOADED)
    top = page.locator(f"{RESULTS}[data-rank='1'] .score")
    assert float(top.get_attribute("data-similarity")) > 0.99 and 0 < float(top.text_content()) <= 1.0001

    shot = tmp_path / "ris-web.png"
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_bad_upload_shows_a_clear_message(page) -> None:
    page.set_input_files("#file-input", files=[{"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": b"no pixels here"}])
    message = page.locator("#message")
    message.wait_for(state="visible")
    assert "Not an image" in message.text_content()

    page.set_input_files("#file-input", str(caltech_images()[0]))
    message.wait_for(state="hidden")  # the next good search clears it
    page.wait_for_function("() => document.querySelector('#results .card[data-rank=\"1\"] .score')?.textContent === '1.000'")
