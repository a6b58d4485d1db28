"""The duplicates view of `ris serve`: GET /api/duplicates and its list over real HTTP, and the page's view in a
real headless Chromium at a phone's size (390×844) and a desktop's (1280×800).

The collection: Caltech-101 photos (four of each of five classes: different photos of one kind of object)
plus copies made here: one photo resized, re-encoded at JPEG quality 30 and cropped, one copied byte for byte,
one resized and cropped. Screenshots go to each test's tmp dir and to $RIS_TEST_ARTIFACTS when set."""

from __future__ import annotations

import io
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ris.collection import Collection
from ris.server import create_app, serve_in_thread
from ris.tools import dupes
from tests.server_fixtures import AUTH, CALTECH, TOKEN, upload
from tests.test_dupes import _bench
from tests.test_web_ui import DESKTOP, FIRST_THUMBS_LOADED, PHONE, boxes, browser_fixture, open_page, per_row, shoot  # noqa: F401 (fixture)

CLASSES = ("accordion", "anchor", "camera", "chair", "panda")
PER_CLASS = 4
#: (class, which photo) -> the copies made of it; every other photo has none
COPIES = {("accordion", 0): ("resize50", "jpeg30", "crop80"), ("camera", 0): ("exact",), ("chair", 0): ("resize50", "crop80")}
GROUPS = "#dupes-groups .group"
THUMBS_LOADED = """() => {
  const imgs = [...document.querySelectorAll('#dupes-groups .group img')];
  return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0);
}"""


def make_images(root: Path) -> dict[str, str]:
    """The photos under root/<class>/ and the copies under root/copies/: {path: path of its original}."""
    if not CALTECH.is_dir():
        pytest.skip(f"Caltech-101 not found at {CALTECH}")
    kinds = _bench().COPY_KINDS  # the copies `ris dupes`' own test and benchmark are measured on
    origin: dict[str, str] = {}
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        for n, src in enumerate(sorted((CALTECH / cls).glob("*.jpg"))[:PER_CLASS]):
            photo = root / cls / src.name
            shutil.copyfile(src, photo)
            origin[str(photo)] = str(photo)
            for kind in COPIES.get((cls, n), ()):
                copy = root / "copies" / f"{kind}-{cls}-{src.name}"
                copy.parent.mkdir(exist_ok=True)
                kinds[kind](photo, copy, np.random.default_rng(0))  # these kinds draw nothing at random
                origin[str(copy)] = str(photo)
    return origin


@pytest.fixture(scope="module")
def dupes_collection(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("webdupes")
    origin = make_images(root / "images")
    with Collection.create(root / "c.ris") as coll:
        coll.add(sorted(origin), workers=0)
    return root / "c.ris", origin


@pytest.fixture(scope="module")
def base_url(dupes_collection: tuple[Path, dict[str, str]]) -> Iterator[str]:
    with serve_in_thread(create_app(dupes_collection[0])) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c


def paths_of(group: dict) -> list[str]:
    return [img["path"] for img in group["images"]]


# --- the API ---------------------------------------------------------------------------------------


def test_copies_are_grouped_with_their_originals(client: httpx.Client, dupes_collection: tuple[Path, dict[str, str]]) -> None:
    path, origin = dupes_collection
    res = client.get("/api/duplicates")
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["images"] == len(origin) == len(CLASSES) * PER_CLASS + 6 and body["verify"] is False
    copies = {p: o for p, o in origin.items() if p != o}
    expected = {frozenset([o, *(p for p, x in copies.items() if x == o)]) for o in set(copies.values())}
    assert {frozenset(paths_of(g)) for g in body["groups"]} == expected  # no two different photos share a group
    assert body["total"] == 3 and body["duplicates"] == len(copies) and body["offset"] == 0
    assert [len(g["images"]) for g in body["groups"]] == [4, 3, 2]  # largest first
    exact = body["groups"][2]
    assert exact["kind"] == "exact" and exact["similarity"] == 1.0 and all(i["similarity"] == 1.0 for i in exact["images"])
    for g in body["groups"]:
        first = g["images"][0]
        assert first["representative"] and first["id"] == g["representative"] and first["similarity"] == 1.0
        assert not any(i["representative"] for i in g["images"][1:])
        assert g["similarity"] == min(i["similarity"] for i in g["images"][1:])
        assert [i["id"] for i in g["images"] if i["keep"]] == [g["keep"]]
        assert all(i["thumbnail"] == f"/api/images/{i['id']}/thumbnail" and i["image"] == f"/api/images/{i['id']}"
                   for i in g["images"])  # fmt: skip
    near = body["groups"][0]
    kept = next(i for i in near["images"] if i["keep"])
    assert kept["path"] == origin[kept["path"]], "keep=largest keeps the full-size original, not a copy"
    thumb = client.get(near["images"][1]["thumbnail"])
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).format == "JPEG"

    with Collection.open(path) as coll:  # what `ris dupes --no-verify` finds, with its default threshold
        lib = dupes.find_duplicates(coll, verify=False)
        assert body["threshold"] == dupes.default_threshold(coll)
    assert [(g.kind, [r.path for r in g.images], g.scores) for g in lib] == [
        (g["kind"], paths_of(g), [i["similarity"] for i in g["images"]]) for g in body["groups"]
    ]


def test_threshold_verify_keep_and_paging(client: httpx.Client, dupes_collection: tuple[Path, dict[str, str]]) -> None:
    _, origin = dupes_collection
    loose = client.get("/api/duplicates", params={"verify": False}).json()
    strict = client.get("/api/duplicates", params={"threshold": 0.97, "verify": False}).json()
    assert strict["threshold"] == 0.97 and strict["verify"] is False
    assert [g["kind"] for g in strict["groups"]] == ["exact"], "at 0.97 only the byte copy is left"
    assert {frozenset(paths_of(g)) for g in strict["groups"]} < {frozenset(paths_of(g)) for g in loose["groups"]}
    confirmed = client.get("/api/duplicates", params={"threshold": 0.97, "verify": True}).json()
    assert {frozenset(paths_of(g)) for g in confirmed["groups"]} == {frozenset(paths_of(g)) for g in loose["groups"]}
    assert all(i["inliers"] >= dupes.DUPE_INLIERS for g in confirmed["groups"] if g["kind"] == "near" for i in g["images"][1:]), \
        "below the threshold, keypoints confirmed each copy"

    first = client.get("/api/duplicates", params={"keep": "first", "limit": 1, "offset": 1}).json()
    assert first["total"] == 3 and first["limit"] == 1 and [g["group"] for g in first["groups"]] == [2]
    group = first["groups"][0]
    assert next(i["path"] for i in group["images"] if i["keep"]) == min(paths_of(group))
    assert first["cached"], "paging and another keep rule reuse the groups found before"
    assert client.get("/api/duplicates", params={"offset": 3}).json()["groups"] == []


def test_keypoint_checked_groups_are_what_ris_dupes_finds(client: httpx.Client, dupes_collection: tuple[Path, dict]) -> None:
    """verify=true: the groups of `ris dupes` (its default), keypoint matches included."""
    path, origin = dupes_collection
    body = client.get("/api/duplicates", params={"verify": True}).json()
    with Collection.open(path) as coll:
        lib = dupes.find_duplicates(coll)
    got = [(g["kind"], paths_of(g), [i["similarity"] for i in g["images"]], [i["inliers"] for i in g["images"]])
           for g in body["groups"]]  # fmt: skip
    assert [(g.kind, [r.path for r in g.images], g.scores, g.inliers) for g in lib] == got
    assert {frozenset(paths_of(g)) for g in body["groups"]} == {frozenset([o, *(p for p, x in origin.items() if x == o)])
                                                               for o in {o for p, o in origin.items() if p != o}}  # fmt: skip


def test_the_list_is_what_ris_dupes_keep_prints(client: httpx.Client, dupes_collection: tuple[Path, dict[str, str]]) -> None:
    path, origin = dupes_collection
    for keep in dupes.KEEP_RULES:
        res = client.get("/api/duplicates/list", params={"keep": keep})
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/tab-separated-values")
        assert "attachment" in res.headers["content-disposition"] and keep in res.headers["content-disposition"]
        with Collection.open(path) as coll:
            expected = "".join(f"{p}\t{k}\n" for p, k in dupes.to_delete(dupes.find_duplicates(coll, verify=False), keep))
        assert res.text == expected
    lines = [line.split("\t") for line in client.get("/api/duplicates/list").text.splitlines()]
    assert sorted(p for p, _ in lines) == sorted(p for p, o in origin.items() if p != o), "largest keeps the originals"
    assert all(origin[p] == kept for p, kept in lines)
    assert all(Path(p).exists() for p in origin), "nothing is deleted"


def test_parameters_are_validated(client: httpx.Client) -> None:
    for params in ({"threshold": 0}, {"threshold": 1.5}, {"threshold": "high"}, {"keep": "biggest"}, {"limit": 0},
                   {"limit": 1000}, {"offset": -1}):  # fmt: skip
        res = client.get("/api/duplicates", params=params)
        assert res.status_code == 422, params
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/api/duplicates"]["get"]
    assert "Nothing is deleted" in op["description"]
    described = {p["name"]: p.get("description", "") for p in op["parameters"]}
    assert set(described) == {"threshold", "verify", "keep", "offset", "limit"} and all(described.values())
    assert "/api/duplicates/list" in spec["paths"]


def test_parallel_requests_share_one_computation(base_url: str) -> None:
    """Requests for a result still being found wait for that one; all answers agree."""
    params = {"threshold": 0.83, "verify": True}

    def ask(_: int) -> str:
        with httpx.Client(base_url=base_url, timeout=120) as c:
            res = c.get("/api/duplicates", params=params)
            assert res.status_code == 200, res.text
            body = res.json()
            return repr((body["groups"], body["seconds"]))

    with ThreadPoolExecutor(6) as pool:
        answers = set(pool.map(ask, range(6)))
    assert len(answers) == 1  # one computation: even its time is the same


def test_a_long_search_answers_202_until_done(dupes_collection: tuple[Path, dict[str, str]]) -> None:
    """Groups that take longer than the server waits (here 10 ms; 10 s by default) come on a later request."""
    with serve_in_thread(create_app(dupes_collection[0], dupes_wait=0.01)) as url, httpx.Client(base_url=url, timeout=60) as c:
        res = c.get("/api/duplicates", params={"verify": True})
        assert res.status_code == 202 and res.headers["retry-after"] == "1" and res.json()["seconds"] >= 0
        for _ in range(600):
            if (res := c.get("/api/duplicates", params={"verify": True})).status_code != 202:
                break
            time.sleep(0.1)
        assert res.status_code == 200 and res.json()["total"] == 3
        assert c.get("/api/duplicates/list", params={"verify": True}).status_code == 200  # the list waits for its groups


def test_a_change_to_the_collection_is_seen(dupes_collection: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """The groups are kept per state of the catalogue: an image added through the API joins its group."""
    path, origin = dupes_collection
    own = tmp_path / "c.ris"
    shutil.copytree(path, own)
    camera = next(p for p, o in origin.items() if p != o and "exact" in p)
    with serve_in_thread(create_app(own, token=TOKEN)) as url, httpx.Client(base_url=url, timeout=120) as c:
        before = c.get("/api/duplicates").json()
        assert c.get("/api/duplicates").json()["cached"]
        copy = tmp_path / "camera-again.png"
        Image.open(camera).save(copy)  # the same pixels, other bytes: a near-duplicate, not an exact one
        assert c.post("/api/images", files=upload(copy), headers=AUTH).status_code == 201
        after = c.get("/api/duplicates").json()
        assert not after["cached"] and after["images"] == before["images"] + 1
        group = next(g for g in after["groups"] if origin[camera] in paths_of(g))
        assert len(group["images"]) == 3 and group["kind"] == "near"


def test_an_empty_or_single_image_collection_has_no_groups(tmp_path: Path) -> None:
    path = tmp_path / "one.ris"
    Collection.create(path).close()
    with serve_in_thread(create_app(path)) as url, httpx.Client(base_url=url, timeout=120) as c:
        body = c.get("/api/duplicates").json()
        assert (body["images"], body["total"], body["groups"]) == (0, 0, [])


# --- the page's view -------------------------------------------------------------------------------


def wait_for_groups(page, count: int | None = None) -> None:
    page.wait_for_function("() => ['groups', 'empty'].includes(document.body.dataset.dupes)")
    if count is not None:
        page.wait_for_function("(n) => document.querySelectorAll('#dupes-groups .group').length === n", arg=count)
    page.wait_for_function(THUMBS_LOADED)


def group_ids(page) -> list[list[str]]:
    return page.evaluate("""() => [...document.querySelectorAll('#dupes-groups .group')]
      .map((g) => [...g.querySelectorAll('.card')].map((c) => c.dataset.id))""")


def test_the_tab_opens_the_groups_threshold_reruns_back_returns(browser, base_url: str, tmp_path: Path) -> None:
    with open_page(browser, base_url, DESKTOP) as page:
        page.evaluate("""() => {
          window.__loadingSeen = false;
          new MutationObserver(() => { window.__loadingSeen ||= !document.querySelector('#dupes-loading').hidden; })
            .observe(document.querySelector('#dupes-loading'), { attributes: true, attributeFilter: ['hidden'] });
        }""")
        page.click("#tab-dupes")
        page.wait_for_url("**/?view=duplicates")
        wait_for_groups(page, 3)
        assert page.evaluate("() => window.__loadingSeen"), "the loading indicator showed while the groups were found"
        assert page.locator("#search-view").is_hidden() and page.locator("#tab-dupes").get_attribute("aria-current") == "page"
        assert [len(g) for g in group_ids(page)] == [4, 3, 2]
        for n in range(3):
            group = page.locator(GROUPS).nth(n)
            first = group.locator(".card").first
            assert "rep" in first.get_attribute("class") and first.locator(".badge.rep").text_content() == "representative"
            assert group.locator(".card.rep").count() == 1 and group.locator(".card.kept").count() == 1
            scores = [float(x) for x in group.locator(".score").all_text_contents()]
            assert len(scores) == group.locator(".card").count() - 1 and all(0.8 <= x <= 1 for x in scores)
        assert per_row(boxes(page, f"{GROUPS}:first-child .card")) == 4, "a desktop shows a group in one row"
        assert page.locator("#threshold-value").text_content() == "0.80"  # the collection's default, from the server
        assert "3 groups" in page.locator("#dupes-title").text_content()
        shoot(page, tmp_path, "desktop-duplicates")

        page.locator("#threshold").fill("0.97")
        page.wait_for_url("**/?view=duplicates&threshold=0.97")
        wait_for_groups(page, 1)
        assert page.locator(GROUPS).first.get_attribute("data-kind") == "exact"
        assert page.locator("#threshold-value").text_content() == "0.97"
        assert "threshold=0.97" in page.locator("#dupes-download").get_attribute("href")
        shoot(page, tmp_path, "desktop-duplicates-0.97")
        page.check("#verify")  # keypoints confirm the copies below the threshold
        page.wait_for_url("**/?view=duplicates&threshold=0.97&verify=true")
        wait_for_groups(page, 3)
        assert page.locator(f"{GROUPS} .score").first.text_content().endswith("✓")

        page.go_back()  # settings replace the view's entry: one step back is the search
        page.wait_for_function("() => document.body.dataset.view === 'search' && document.body.dataset.state === 'start'")
        assert page.url.rstrip("/") == base_url and page.locator("#dupes-view").is_hidden()
        assert page.locator("#dropzone").is_visible()
        page.go_forward()
        page.wait_for_url("**/?view=duplicates&threshold=0.97&verify=true")
        wait_for_groups(page, 3)
        assert page.locator("#threshold").input_value() == "0.97" and page.locator("#verify").is_checked()


def test_phone_layout_fits_the_screen(browser, base_url: str, tmp_path: Path) -> None:
    with open_page(browser, f"{base_url}/?view=duplicates", PHONE) as page:
        wait_for_groups(page, 3)
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"no sideways scrolling on a phone: page is {width} px wide"
        cards = boxes(page, f"{GROUPS}:first-child .card")
        assert per_row(cards) == 3 and all(c["x"] + c["width"] <= PHONE["width"] for c in cards)
        for selector in ("#tab-search", "#tab-dupes", "#threshold", "#keep", "#dupes-download"):
            box = page.locator(selector).bounding_box()
            assert box["height"] >= 40, f"{selector} is big enough for a thumb: {box}"
        for card in page.locator(f"{GROUPS} .card").all():  # captions stay inside their card
            caption, thumb = card.locator(".row").bounding_box(), card.locator("button").bounding_box()
            assert caption["x"] + caption["width"] <= thumb["x"] + thumb["width"] + 1
        shoot(page, tmp_path, "phone-duplicates")
        shoot(page, tmp_path, "phone-duplicates-on-screen", full_page=False)


def test_a_thumbnail_searches_for_more_like_it(browser, base_url: str) -> None:
    with open_page(browser, f"{base_url}/?view=duplicates", PHONE) as page:
        wait_for_groups(page, 3)
        first = group_ids(page)[0]
        page.locator(f"{GROUPS}:first-child .card.rep button").click()
        page.wait_for_url(f"**/?id={first[0]}&k=20")
        page.wait_for_function(FIRST_THUMBS_LOADED)
        shown = [page.locator("#results .card").nth(i).get_attribute("data-id") for i in range(3)]
        assert sorted(shown) == sorted(first[1:]), "its copies are its nearest images"
        page.go_back()
        page.wait_for_url("**/?view=duplicates")
        wait_for_groups(page, 3)


def test_copy_and_download_the_list_of_the_others(browser, base_url: str, tmp_path: Path) -> None:
    listing = httpx.get(f"{base_url}/api/duplicates/list", params={"keep": "first"}, timeout=120).text
    with open_page(browser, f"{base_url}/?view=duplicates&keep=first", DESKTOP) as page:
        page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base_url)
        wait_for_groups(page, 3)
        assert page.locator("#keep").input_value() == "first"
        group = page.locator(GROUPS).first
        group.locator("button.copy").click()
        page.wait_for_function("() => document.querySelector('#dupes-groups .group button.copy').textContent.includes('Copied')")
        copied = page.evaluate("() => navigator.clipboard.readText()")
        others = [p for p, _ in (line.split("\t") for line in listing.splitlines())]
        links = group.locator(".card:not(.kept) .name").all()
        names = [a.get_attribute("title").removesuffix(" (open the original)") for a in links]
        assert copied.splitlines() == names and set(names) <= set(others)
        with page.expect_download() as download:
            page.click("#dupes-download")
        saved = tmp_path / download.value.suggested_filename
        download.value.save_as(saved)
        assert saved.read_text() == listing and saved.name.endswith(".tsv")


def test_error_and_empty_states(browser, base_url: str, tmp_path: Path) -> None:
    with open_page(browser, f"{base_url}/?view=duplicates&threshold=2", PHONE) as page:
        page.wait_for_function("() => document.body.dataset.dupes === 'error'")
        message = page.locator("#dupes-message")
        assert message.is_visible() and "less than or equal to 1" in message.text_content()
        assert page.locator("#dupes-loading").is_hidden()
        shoot(page, tmp_path, "phone-duplicates-error")
    path = tmp_path / "none.ris"
    with Collection.create(path) as coll:
        coll.add(sorted((CALTECH / "panda").glob("*.jpg"))[:2], workers=0)
    with serve_in_thread(create_app(path)) as url, open_page(browser, f"{url}/?view=duplicates", PHONE) as page:
        page.wait_for_function("() => document.body.dataset.dupes === 'empty'")
        assert page.locator("#dupes-title").text_content() == "No duplicates"
        assert "No duplicates at similarity ≥ 0.80 among 2 images" in page.locator("#dupes-groups .empty").text_content()
        assert page.locator("#dupes-download").get_attribute("aria-disabled") == "true"
        shoot(page, tmp_path, "phone-duplicates-empty")


def test_paging_from_the_address(browser, base_url: str) -> None:
    with open_page(browser, f"{base_url}/?view=duplicates&offset=1", DESKTOP) as page:
        wait_for_groups(page, 2)
        assert page.locator(GROUPS).first.locator("h3").text_content().startswith("Group 2 ")
        assert page.locator("#dupes-page").text_content() == "groups 2–3 of 3" and page.locator("#dupes-next").is_disabled()
        page.click("#dupes-prev")
        page.wait_for_url("**/?view=duplicates")
        wait_for_groups(page, 3)
        assert page.locator(".dupes-pager").is_hidden(), "one page of groups needs no pager"
