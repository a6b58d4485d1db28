"""The web page end to end in a real headless Chromium, at a phone's size (390×844) and a desktop's (1280×800):
layout, upload, more like this, loading/error/empty states, Show N, Back/Forward.

Full-page screenshots go to each test's tmp dir and, when $RIS_TEST_ARTIFACTS is set, are copied there."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from ris.collection import Collection
from ris.server import create_app, serve_in_thread
from tests.server_fixtures import build_collection, caltech_images

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}
RESULTS = "#results .card"
FIRST_THUMBS_LOADED = """() => {
  const imgs = [...document.querySelectorAll('#results .card img')].slice(0, 4);
  return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0);
}"""
#: Records whether the loading indicator was ever visible (read when each change is observed).
WATCH_LOADING = """() => {
  window.__loadingSeen = [];
  new MutationObserver(() => window.__loadingSeen.push(!document.querySelector('#loading').hidden))
    .observe(document.querySelector('#loading'), { attributes: true, attributeFilter: ['hidden'] });
}"""
#: Records the file each search request sends (size, type, the file itself).
SENT_FILES = """() => {
  const fetch = window.fetch;
  window.__sent = [];
  window.fetch = (url, options) => {
    const file = options && options.body instanceof FormData ? options.body.get('file') : null;
    if (file) window.__sent.push([file.size, file.type, file]);
    return fetch(url, options);
  };
}"""
QUERY = caltech_images(offset=8, per_category=1)[0]  # an accordion that is not in the collection


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_in_thread(create_app(build_collection(tmp_path_factory.mktemp("ui")))) as url:
        yield url


@pytest.fixture(scope="module", name="browser")
def browser_fixture():
    """Headless Chromium (Debian's), one per test module; tests/test_web_dupes.py imports this fixture too."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):  # .ci/run installs it: a missing browser in CI is a failure, not a skip
            pytest.fail(f"no Chromium at {CHROMIUM}")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def open_page(browser, url: str, viewport: dict[str, int]) -> Iterator[Any]:
    """A fresh page (own history) at url; fails the test on any JavaScript error, closes it after."""
    context = browser.new_context(viewport=viewport)
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.wait_for_function("() => /\\d+ images? ·/.test(document.querySelector('#collection-info').textContent)")
        yield page
        assert not errors, f"JavaScript errors: {errors}"
    finally:
        context.close()


@pytest.fixture
def phone(browser, base_url: str) -> Iterator[Any]:
    with open_page(browser, base_url, PHONE) as page:
        yield page


@pytest.fixture
def desktop(browser, base_url: str) -> Iterator[Any]:
    with open_page(browser, base_url, DESKTOP) as page:
        yield page


def shoot(page, tmp_path: Path, name: str, full_page: bool = True) -> Path:
    """A screenshot (full page, or what is on screen) under tmp_path, copied to $RIS_TEST_ARTIFACTS when set."""
    shot = tmp_path / f"{name}.png"
    page.screenshot(path=str(shot), full_page=full_page)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    if artifacts := os.environ.get("RIS_TEST_ARTIFACTS"):
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / shot.name)
    return shot


def upload(page, path: Path = QUERY) -> None:
    page.set_input_files("#file-input", str(path))
    page.wait_for_function("(name) => document.querySelector('#results-note').textContent.includes(name)", arg=path.name)
    page.wait_for_function(FIRST_THUMBS_LOADED)


def boxes(page, selector: str = RESULTS) -> list[dict[str, float]]:
    return [page.locator(selector).nth(i).bounding_box() for i in range(page.locator(selector).count())]


def per_row(cards: list[dict[str, float]]) -> int:
    """How many cards share the first row (same top edge)."""
    return sum(1 for box in cards if abs(box["y"] - cards[0]["y"]) < 1)


def first_id(page) -> str:
    return page.locator(f"{RESULTS}[data-rank='1']").get_attribute("data-id")


def test_first_search_shows_loading_then_results(desktop, tmp_path: Path) -> None:
    assert desktop.locator("#sample .card").count() > 0, "the collection's sample is shown"
    desktop.evaluate(WATCH_LOADING)
    upload(desktop)
    assert True in desktop.evaluate("() => window.__loadingSeen"), "the loading indicator showed on the first search"
    assert desktop.locator("#loading").is_hidden()
    first = desktop.locator(RESULTS)
    assert first.count() == 20
    assert desktop.locator("#query-preview").is_visible()
    caption = first.nth(0).locator("figcaption").text_content()
    assert "#1" in caption and (".jpg" in caption or ".png" in caption)
    score = first.nth(0).locator(".score")
    assert 0 < float(score.get_attribute("data-similarity")) <= 1.0001 and "cosine" in score.get_attribute("title")
    assert desktop.locator(f"{RESULTS} .badge.same").count() == 0  # a photo of nothing indexed: no image is its picture
    assert per_row(boxes(desktop)) >= 4, "a desktop shows several results per row"
    shoot(desktop, tmp_path, "desktop-results")


def test_phone_layout_is_a_grid(phone, tmp_path: Path) -> None:
    shoot(phone, tmp_path, "phone-start")
    upload(phone)
    cards = boxes(phone)
    assert len(cards) == 20
    assert per_row(cards) >= 3, f"at 390 px results are three to a row: {cards[:3]}"
    width = phone.evaluate("() => document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"no sideways scrolling on a phone: page is {width} px wide"
    preview = phone.locator("#query-preview").bounding_box()
    assert preview["height"] <= 100, f"the query preview is compact on a phone: {preview}"
    select = phone.locator("#k").bounding_box()
    assert select["height"] >= 40, f"Show N is big enough for a thumb: {select}"
    results = phone.locator("#results").bounding_box()
    assert results["height"] < 2500, f"20 results fit in a few screens on a phone: {results}"
    shoot(phone, tmp_path, "phone-results")


def test_more_like_this_scrolls_to_new_results_without_itself(phone, tmp_path: Path) -> None:
    upload(phone)
    clicked = phone.locator(RESULTS).nth(7)
    clicked_id = clicked.get_attribute("data-id")
    clicked.locator("button").click()
    phone.wait_for_url(f"**/?id={clicked_id}&k=20")
    phone.wait_for_function(FIRST_THUMBS_LOADED)
    assert phone.locator(RESULTS).count() == 20
    ids = [phone.locator(RESULTS).nth(i).get_attribute("data-id") for i in range(20)]
    assert clicked_id not in ids, "the clicked image is the query, not its own #1"
    assert phone.locator("#results-query").get_attribute("src") == f"/api/images/{clicked_id}/thumbnail"
    phone.wait_for_function("""() => {
      const top = document.querySelector('#results-section').getBoundingClientRect().top;
      return Math.abs(top) < 2;  // smooth scrolling ends with the results at the top of the screen
    }""")
    assert phone.evaluate("() => window.scrollY") > 0
    shoot(phone, tmp_path, "phone-more-like-this-on-screen", full_page=False)
    shoot(phone, tmp_path, "phone-more-like-this")


def test_bad_upload_keeps_previous_results(desktop, tmp_path: Path) -> None:
    upload(desktop)
    before = [desktop.locator(RESULTS).nth(i).get_attribute("data-id") for i in range(5)]
    preview = desktop.locator("#query-preview").get_attribute("src")
    bad = {"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": b"no pixels here"}
    desktop.set_input_files("#file-input", files=[bad])
    message = desktop.locator("#message")
    message.wait_for(state="visible")
    assert "Not an image" in message.text_content()
    desktop.wait_for_function("() => document.body.dataset.state === 'error'")
    assert [desktop.locator(RESULTS).nth(i).get_attribute("data-id") for i in range(5)] == before
    assert desktop.locator("#query-preview").get_attribute("src") == preview, "no broken preview"
    assert QUERY.name in desktop.locator("#results-note").text_content()
    shoot(desktop, tmp_path, "desktop-bad-upload")

    upload(desktop, caltech_images()[0])  # an indexed image: the next good search clears the message
    message.wait_for(state="hidden")
    assert desktop.locator(f"{RESULTS}[data-rank='1'] .score").get_attribute("data-similarity") == "1.000"


def test_a_phone_sized_photo_is_sent_shrunk_and_still_finds_its_original(phone, tmp_path: Path) -> None:
    """A 12-MP JPEG of several MB (a phone's photo) leaves the browser at most 1,600 px wide, upright as its EXIF
    orientation says; the search finds the indexed image it shows. Small files are sent as they are."""
    import numpy as np
    from PIL import Image

    original = caltech_images()[1]
    phone.evaluate(SENT_FILES)
    upload(phone, original)
    indexed = first_id(phone)
    assert phone.evaluate("() => window.__sent.at(-1).slice(0, 2)") == [original.stat().st_size, "image/jpeg"]  # as it is

    img = Image.open(original).convert("RGB")
    big = img.resize((4000, round(4000 * img.height / img.width)), Image.BICUBIC)
    noise = np.random.default_rng(0).integers(-6, 7, (big.height, big.width, 3))
    big = Image.fromarray(np.clip(np.asarray(big, np.int16) + noise, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: shown upright by turning it 90 degrees clockwise
    photo = tmp_path / "IMG_0001.jpg"
    big.transpose(Image.Transpose.ROTATE_90).save(photo, quality=95, exif=exif)
    assert photo.stat().st_size > 3_000_000
    upload(phone, photo)
    assert first_id(phone) == indexed
    same = phone.locator(RESULTS).nth(0).locator(".badge.same")  # keypoints confirm it: the same picture
    assert same.is_visible() and same.text_content() == "✓ same scene" and "keypoint matches agree" in same.get_attribute("title")
    assert phone.locator(f"{RESULTS} .badge.same").count() == 1
    shoot(phone, tmp_path, "phone-same-picture", full_page=False)
    size, kind, width, height = phone.evaluate("""async () => {
      const [size, kind, file] = window.__sent.at(-1);
      const bitmap = await createImageBitmap(file);
      return [size, kind, bitmap.width, bitmap.height];
    }""")
    upright = tuple(round(side * 1600 / max(big.size)) for side in big.size)  # not the file's turned one
    assert kind == "image/jpeg" and 20_000 < size < 800_000 and (width, height) == upright, (size, width, height)


@pytest.mark.parametrize(("name", "mime"), [("DSC_0042.DNG", "image/x-adobe-dng"), ("DSC_0042.DNG", "application/octet-stream"),
                                           ("IMG_0042.HEIC", "image/heic")])  # fmt: skip
def test_a_query_the_browser_cannot_show_is_shown_from_the_servers_thumbnail(desktop, tmp_path: Path, name: str,
                                                                             mime: str) -> None:  # fmt: skip
    """Chromium shows neither camera RAW nor HEIC: the page shows the thumbnail the server sends back, upright, and
    the original of the photo comes first (a system that knows no type for a file is no reason to refuse it)."""
    import io

    from PIL import Image

    from tests.rawfiles import dng

    original = caltech_images()[2]
    upload(desktop, original)
    indexed = first_id(desktop)
    photo = Image.open(original)
    if name.endswith(".DNG"):
        data = dng(photo, orientation=8)  # developed: no preview; the camera was held turned
    else:
        buf = io.BytesIO()
        photo.save(buf, "HEIF", quality=80)  # pillow-heif
        data = buf.getvalue()
    desktop.set_input_files("#file-input", files=[{"name": name, "mimeType": mime, "buffer": data}])
    desktop.wait_for_function("(name) => document.querySelector('#results-note').textContent.includes(name)", arg=name)
    desktop.wait_for_function(FIRST_THUMBS_LOADED)
    assert first_id(desktop) == indexed
    preview = desktop.locator("#query-preview")
    assert preview.get_attribute("src").startswith("data:image/jpeg;base64,")
    width, height = preview.evaluate("(img) => [img.naturalWidth, img.naturalHeight]")
    assert width / height == pytest.approx(photo.width / photo.height, rel=0.02)  # upright, not a broken image
    shoot(desktop, tmp_path, f"desktop-query-{name}-{mime.split('/')[1]}")


def test_show_n_reruns_the_search(desktop) -> None:
    upload(desktop)
    assert desktop.locator(RESULTS).count() == 20
    desktop.select_option("#k", "5")
    desktop.wait_for_function("() => document.querySelectorAll('#results .card').length === 5")
    clicked_id = desktop.locator(RESULTS).nth(1).get_attribute("data-id")
    desktop.locator(RESULTS).nth(1).locator("button").click()
    desktop.wait_for_url(f"**/?id={clicked_id}&k=5")
    desktop.select_option("#k", "10")
    desktop.wait_for_url(f"**/?id={clicked_id}&k=10")
    desktop.wait_for_function("() => document.querySelectorAll('#results .card').length === 10")


def test_back_and_forward_walk_the_queries(desktop, base_url: str) -> None:
    upload(desktop)
    assert desktop.url.rstrip("/") == base_url
    a = desktop.locator(RESULTS).nth(0).get_attribute("data-id")
    desktop.locator(RESULTS).nth(0).locator("button").click()
    desktop.wait_for_url(f"**/?id={a}&k=20")
    b = desktop.locator(RESULTS).nth(3).get_attribute("data-id")
    desktop.locator(RESULTS).nth(3).locator("button").click()
    desktop.wait_for_url(f"**/?id={b}&k=20")
    desktop.wait_for_function(FIRST_THUMBS_LOADED)

    shown = "(id) => document.querySelector('#query-preview').getAttribute('src') === `/api/images/${id}/thumbnail`"
    desktop.go_back()
    desktop.wait_for_url(f"**/?id={a}&k=20")
    desktop.wait_for_function(shown, arg=a)
    desktop.wait_for_function("(id) => document.querySelector('#results .card')?.dataset.id !== id", arg=a)
    desktop.go_back()  # the upload: still in memory while the page stays open
    desktop.wait_for_function("(name) => document.querySelector('#results-note').textContent.includes(name)", arg=QUERY.name)
    assert desktop.url.rstrip("/") == base_url
    desktop.go_back()  # the page as first opened: still the app, empty
    desktop.wait_for_function("() => document.body.dataset.state === 'start'")
    assert desktop.locator(RESULTS).count() == 0 and desktop.url.rstrip("/") == base_url
    desktop.go_forward()
    desktop.wait_for_function("(name) => document.querySelector('#results-note').textContent.includes(name)", arg=QUERY.name)
    desktop.go_forward()
    desktop.wait_for_function(shown, arg=a)


def test_a_search_by_id_opens_from_its_url(browser, base_url: str, tmp_path: Path) -> None:
    image_id = httpx.get(f"{base_url}/api/collection?limit=1").json()["sample"][0]["id"]
    with open_page(browser, f"{base_url}/?id={image_id}&k=5", PHONE) as page:
        page.wait_for_function("() => document.querySelectorAll('#results .card').length === 5")
        assert page.locator("#k").input_value() == "5"
        assert str(image_id) not in [page.locator(RESULTS).nth(i).get_attribute("data-id") for i in range(5)]
        page.wait_for_function(FIRST_THUMBS_LOADED)
        shoot(page, tmp_path, "phone-by-url")


def test_search_by_id_can_leave_the_image_out(base_url: str) -> None:
    image_id = httpx.get(f"{base_url}/api/collection?limit=1").json()["sample"][0]["id"]
    plain = httpx.get(f"{base_url}/api/search", params={"id": image_id, "k": 4}, timeout=60).json()["matches"]
    assert plain[0]["id"] == image_id
    others = httpx.get(f"{base_url}/api/search", params={"id": image_id, "k": 4, "exclude_self": True}, timeout=60).json()
    assert [m["id"] for m in others["matches"]] == [m["id"] for m in plain[1:]] + [others["matches"][-1]["id"]]
    assert [m["rank"] for m in others["matches"]] == [1, 2, 3, 4]
    assert image_id not in [m["id"] for m in others["matches"]]


def test_a_collection_of_one_shows_the_empty_state(browser, tmp_path: Path) -> None:
    path = tmp_path / "one.ris"
    with Collection.create(path) as coll:
        coll.add(caltech_images(per_category=1)[:1], workers=0)
    with serve_in_thread(create_app(path)) as url, open_page(browser, url, PHONE) as page:
        page.locator("#sample .card button").first.click()
        page.wait_for_function("() => document.body.dataset.state === 'empty'")
        assert "No matches" in page.locator("#results-title").text_content()
        assert "1 image ·" in page.locator("#collection-info").text_content()
        assert page.locator("#results .empty").is_visible()
        shoot(page, tmp_path, "phone-empty")
