"""The second look (ris.search.views): copies pasted small onto another picture or rotated by tens of degrees are found
first; queries the first search confirms, and the rest of every list, are what the plain path gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ris.collection import Collection
from ris.images import edits
from ris.images.decode import open_image, read_file
from ris.search import views

from .conftest import CALTECH, caltech_files

CLASSES = 30  # 300 images: enough look-alikes that the plain path misses some copies


@pytest.fixture(scope="module")
def coll(tmp_path_factory: pytest.TempPathFactory):
    if not CALTECH.is_dir():
        pytest.skip(f"Caltech-101 not found at {CALTECH}")
    classes = sorted(p.name for p in CALTECH.iterdir() if p.is_dir() and p.name != "BACKGROUND_Google")[:CLASSES]
    with Collection.open_or_create(tmp_path_factory.mktemp("copies") / "c.ris") as c:
        c.index([f for cls in classes for f in caltech_files(cls, 10)])
        yield c


def _copies(coll: Collection, kind: str, n: int = 12) -> tuple[list, list[Image.Image]]:
    rows = coll.catalog.all_rows()
    picked = [rows[i] for i in np.random.default_rng(7).choice(len(rows), n, replace=False)]
    others = [open_image(read_file(str(f))) for f in caltech_files("Faces_easy", 4)]  # backgrounds: not indexed
    made = [edits.edit(kind, open_image(read_file(r.path)), edits.rng_for(3, kind, i), lambda i=i: others[i % 4])
            for i, r in enumerate(picked)]  # fmt: skip
    return picked, made


def _plain_path(coll: Collection, queries: list[Image.Image], k: int = 5):
    """Today's verified search without the second look (the same ranker, no model for views)."""
    return coll.ranker.search(coll.embed(queries), k, ["<image>"] * len(queries), coll.manifest.query_expansion,
                              None, queries, 1, embed=None)  # fmt: skip


def test_pasted_copies_are_found_first(coll: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pictures pasted at 25-50% of the side onto other photos or busy textures: the crops of their pasted picture
    (ris.search.views.pasted) find their originals, where keypoints of the 5 nearest alone find fewer (full
    Caltech-101, harsh set, seed 1: recall@1 0.28 before the crops, 0.58 with them)."""
    picked, made = _copies(coll, "pip")
    found = [r.matches[0].id for r in coll.search_many(made, k=5)]
    monkeypatch.setattr(views, "pasted", lambda img: views.Pasted([], [], []))
    before = [r.matches[0].id for r in _plain_path(coll, made)]
    truth = [r.id for r in picked]
    hits, hits_before = (sum(a == b for a, b in zip(got, truth, strict=True)) for got in (found, before))
    assert hits >= 9 and hits > hits_before + 2, (found, before, truth)


def test_a_pasted_picture_is_cropped_along_its_border(coll: Collection) -> None:
    """Where the pip edit pasted the picture (found exactly by template matching), one of `pasted`'s crops covers
    it (IoU > 0.85) for most copies (full Caltech-101, seeds 0-2: 0.69, 0.56, 0.58), in a few ms at 480 px."""
    import cv2

    picked, made = _copies(coll, "pip", n=16)
    good = 0
    for row, img in zip(picked, made, strict=True):
        small = img.copy()
        small.thumbnail((480, 480))
        scale = small.width / img.width
        original = np.asarray(open_image(read_file(row.path)).convert("L"), np.float32)
        whole = np.asarray(img.convert("L"), np.float32)
        if original.shape[0] > whole.shape[0] or original.shape[1] > whole.shape[1]:
            continue  # scaled down to fit: not where template matching finds it
        _, _, _, (x, y) = cv2.minMaxLoc(cv2.matchTemplate(whole, original, cv2.TM_CCOEFF_NORMED))
        truth = np.array([x, y, x + original.shape[1], y + original.shape[0]]) * scale
        boxes = views.boxes(np.asarray(small.convert("L"), np.float32))
        good += max((views._overlap(tuple(truth), b) for b in boxes), default=0) > 0.85
    assert good >= 7, good


def test_views_bring_rotated_copies_back(coll: Collection) -> None:
    """A copy rotated by 15-40 degrees: its best view is nearer its original than the copy itself, for many (12
    copies: 5, by 0.02 or more; on full Caltech-101 recall@1 0.70 -> 0.87 at the views' ranking, seed 0)."""
    picked, made = _copies(coll, "rotate")
    _, plain = coll.vectors()
    by_id = dict(zip([r.id for r in coll.catalog.all_rows()], plain, strict=True))
    own = np.stack([by_id[r.id] for r in picked])
    as_is = (coll.embed(made) * own).sum(axis=1)
    best = [float((coll.embed(views.views(img)) @ o).max()) for img, o in zip(made, own, strict=True)]
    assert sum(b > a + 0.02 for a, b in zip(as_is, best, strict=True)) >= 4 and sum(best) > sum(as_is), (as_is, best)


def test_unedited_and_unrelated_queries_keep_the_plain_path(coll: Collection) -> None:
    """An indexed image is confirmed at once (no second look); a photo of none of the collection's pictures
    keeps the plain path's list, at most with a confirmed first place, and monotonic scores."""
    rows = coll.catalog.all_rows()[:4]
    queries = [open_image(read_file(r.path)) for r in rows] + [
        open_image(read_file(str(f))) for f in caltech_files("Faces_easy", 3, start=10)
    ]
    new, old = coll.search_many(queries, k=8), _plain_path(coll, queries, k=8)
    for got, plain in zip(new[:4], old[:4], strict=True):
        assert got.matches == plain.matches
    for got, plain in zip(new[4:], old[4:], strict=True):
        assert [m.path for m in got.matches[1:]] == [m.path for m in plain.matches if m.path != got.matches[0].path][:7]
    for got in new:
        scores = [m.score for m in got.matches]
        assert scores == sorted(scores, reverse=True)


def test_a_views_turn_is_the_copies_turn_within_a_grey_level() -> None:
    """The second look turns the query with OpenCV (views.turned, ~6x faster) where the copies use PIL's rotate
    (edits.rotated): the same box, and the same pixels but for rounding, on real photos and a grey one."""
    imgs = [open_image(read_file(str(f))) for f in caltech_files("airplanes", 2) + caltech_files("Faces_easy", 2)]
    for img in [*imgs, imgs[0].convert("L")]:
        for angle in (*views.ANGLES, 7.5):
            ours = np.asarray(views.turned(img, angle), np.int16)
            theirs = np.asarray(edits.rotated(img.convert("RGB"), angle), np.int16)
            assert ours.shape == theirs.shape
            off = np.abs(ours - theirs)
            assert off.mean() < 1.0 and (off > 1).mean() < 1e-3, (off.mean(), (off > 1).mean())


@pytest.mark.parametrize("size", [(1, 1), (3, 200), (640, 2), (64, 64)])
def test_views_of_any_size(size: tuple[int, int]) -> None:
    """Every view is a non-empty image, whatever the query's shape."""
    img = Image.new("RGB", size, (120, 30, 200))
    shots = views.views(img)
    assert len(shots) == len(views.QUARTER_TURNS) + len(views.ANGLES) + len(views.WINDOWS)
    assert all(s.width >= 1 and s.height >= 1 for s in shots)


def test_work_on_threads_keeps_order_reuses_its_threads_nests_and_raises() -> None:
    """A served query runs several small parallel steps: starting threads for each cost more than the work."""
    import threading
    import time

    from ris.model.runtime import cpu_threads
    from ris.threads import on_threads

    names: set[str] = set()

    def square(x: int) -> int:
        names.add(threading.current_thread().name)
        time.sleep(0.005)  # as long as a candidate's decoding: the pool's thread takes items too
        return x * x

    for _ in range(20):
        assert on_threads(square, list(range(9)), 2) == [x * x for x in range(9)]
    helpers = names - {threading.current_thread().name}
    assert 1 <= len(helpers) <= max(1, cpu_threads() - 1) < 20  # the shared pool's threads, not one pool a call
    assert on_threads(lambda x: on_threads(lambda y: x + y, [1, 2, 3], 2), [10, 20], 2) == [[11, 12, 13], [21, 22, 23]]

    def five(x: int) -> int:
        if x == 5:
            raise ValueError("five")
        return x

    with pytest.raises(ValueError, match="five"):
        on_threads(five, list(range(10)), 2)


def test_keypoint_matching_finds_the_two_nearest_descriptors_as_opencv_does() -> None:
    """verify.nearest_two (FAISS's popcount scan) gives OpenCV's brute-force Hamming distances, on a thread of its own
    without changing the caller's FAISS threads; a rotated half-size copy still confirms its original only."""
    import threading

    import cv2
    import faiss

    from ris.search import verify

    files = caltech_files("airplanes", 2) + caltech_files("Leopards", 1)
    feats = [verify.features(open_image(read_file(str(f)))) for f in files]
    copy = open_image(read_file(str(files[0]))).rotate(25, expand=True)
    query = verify.query_views(copy.resize((copy.width // 2, copy.height // 2)))[0][0]
    for a, b in [(query, f) for f in feats] + [(feats[1], feats[2])]:
        dist, nearest = verify.nearest_two(a[1], b[1])
        pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(a[1], b[1], k=2)
        assert np.array_equal(dist, [[p[0].distance, p[1].distance] for p in pairs])
        unique = dist[:, 0] < dist[:, 1]
        assert np.array_equal(nearest[unique, 0], [p[0].trainIdx for p, u in zip(pairs, unique, strict=True) if u])
    counts = [verify.inliers(query, f) for f in feats]
    assert counts[0] >= verify.MIN_INLIERS > max(counts[1:])
    before = faiss.omp_get_max_threads()
    worker = threading.Thread(target=verify.nearest_two, args=(feats[0][1], feats[1][1]))
    worker.start()
    worker.join()
    verify.nearest_two(feats[0][1], feats[1][1])
    assert faiss.omp_get_max_threads() == before


def test_blurred_darkened_and_thumbnail_copies_are_found_by_their_signature(coll: Collection) -> None:
    """Strong blur with a brightness change, and thumbnails a fifth of the size at JPEG quality 10-20: their 16 x 16
    grey layout finds the original first where keypoints and the second look miss some (full Caltech-101, seed 1:
    recall@1 0.73 -> 0.98 and 0.45 -> 1.00)."""
    totals = np.zeros(2, int)
    for kind in ("blur_bright", "thumb_jpeg"):
        picked, made = _copies(coll, kind, n=20)
        truth = [r.id for r in picked]
        found = [r.matches[0].id for r in coll.search_many(made, k=5)]
        without = coll.ranker.search(coll.embed(made), 5, ["<image>"] * len(made), coll.manifest.query_expansion, None,
                                     made, 1, embed=coll.embed)  # fmt: skip
        hits = [sum(a == b for a, b in zip(got, truth, strict=True)) for got in (found, [r.matches[0].id for r in without])]
        assert hits[0] >= 19, (kind, found, truth)
        totals += hits
    assert totals[0] > totals[1], totals


def test_a_large_collection_compares_the_signatures_of_its_candidates_only(coll: Collection, monkeypatch) -> None:
    """Above SCAN_MAX images no scan is kept: a thumbnail still finds its original among the query's candidates, the
    same match the scan gives; a flat picture (no signature) and a picture matching nothing find none."""
    from ris.images import signature
    from ris.images.decode import resize
    from ris.search import copies

    picked, made = _copies(coll, "thumb_jpeg", n=6)
    sigs = np.stack([signature.of_pixels(resize(img, coll.manifest.input_size)) for img in made])
    flat = np.full((1, signature.WIDTH), 128, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (1, signature.WIDTH), dtype=np.uint8)
    queries = np.vstack([sigs, flat, noise])
    others = np.array([r.id for r in coll.catalog.all_rows()[:40]])
    candidates = [np.append(others, r.id) for r in picked] + [others, others]
    scan = copies.SignatureIndex(coll.catalog).best("state", queries, candidates)
    monkeypatch.setattr(copies, "SCAN_MAX", 10)
    looked_up = copies.SignatureIndex(coll.catalog).best("state", queries, candidates)
    ids = [[f[0] if f else None for f in found] for found in (scan, looked_up)]
    assert ids[0] == ids[1] == [r.id for r in picked] + [None, None]
    assert all(f[1] >= copies.MIN_NCC for f in scan[:6])


def test_signatures_on_the_gpu_path_equal_the_cpu_ones() -> None:
    """GPU-decoded batches get their signatures from the tensor (ris.images.signature.of_tensor): the same box means;
    an image searched alone gets the signature it was stored with in a batch."""
    torch = pytest.importorskip("torch")
    from ris.images import signature
    from ris.images.decode import decode_file

    for size in (224, 260):
        pixels = np.stack([decode_file(str(f), size).pixels for f in caltech_files("cup", 6)])
        on_tensor = signature.of_tensor(torch.from_numpy(pixels)).astype(int)
        batched = signature.of_pixels(pixels)  # 224: the batch as one tall picture; 260: image by image
        assert np.abs(on_tensor - batched).max() <= 1  # float sums in another order
        assert all(np.array_equal(signature.of_pixels(one), row) for one, row in zip(pixels, batched, strict=True))


def test_a_turned_picture_with_black_corners_is_straightened_back(coll: Collection) -> None:
    """A copy turned by 15-40 degrees with its corners filled black: turned back and cut out, its signature is its
    original's again (NCC >= 0.9) for most; a picture without black corners gives no such crop."""
    from ris.images import signature

    picked = coll.catalog.all_rows()[::25][:12]
    matched = 0
    for n, row in enumerate(picked):
        original = open_image(read_file(row.path))
        turned = original.rotate(15 + 2 * n, expand=True, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
        crops = views.straightened(turned)
        sigs = [signature.of_image(c) for c in crops]
        matched += bool(sigs) and max(coll.ranker.signatures.ncc(np.stack(sigs), [row.id] * len(sigs))) >= 0.9
        assert views.straightened(original) == []
    assert matched >= 9, matched


def test_the_image_verification_confirms_next_comes_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Among many side views of cars, a noisy copy's original comes first, and a cropped re-post of the same photo
    (confirmed by keypoints) comes second more often than before the rule, where look-alike cars came before it
    (24 queries: 13 re-posts second against 7; harsh copy set, seed 1: recall@5 0.947 -> 0.951)."""
    from ris.search import ranking

    cars = caltech_files("car_side", 120)
    picked = cars[::5]
    reposts = []
    for i, f in enumerate(picked):
        reposts.append(tmp_path / f"repost{i}.jpg")
        edits.edit("offcentre_crop", open_image(read_file(str(f))), edits.rng_for(5, "offcentre_crop", i), None).save(reposts[-1])
    queries = [edits.edit("noise_jpeg", open_image(read_file(str(f))), edits.rng_for(6, "noise_jpeg", i), None)
               for i, f in enumerate(picked)]  # fmt: skip

    def second(results) -> int:
        return sum(Path(r.matches[1].path) == repost for r, repost in zip(results, reposts, strict=True))

    with Collection.open_or_create(tmp_path / "c.ris") as c:
        c.index(cars + caltech_files("airplanes", 20) + caltech_files("Motorbikes", 20) + reposts)
        results = c.search_many(queries, k=5)
        monkeypatch.setattr(ranking, "_runners_up", lambda checked, first, places=1: [])
        without = c.search_many(queries, k=5)
    assert [Path(r.matches[0].path) for r in results] == picked
    assert second(results) >= second(without) + 3, (second(results), second(without))


def test_a_pixelated_copy_is_found_by_its_signature_over_weak_keypoint_matches(tmp_path: Path, monkeypatch) -> None:
    """A pixelated copy (blocks of 6-10% of the side): its block corners give unrelated pictures (cluttered scenes) a
    dozen or two agreeing keypoint matches, which no longer overrule its original's signature match
    (copies.OVERRULE_INLIERS; held-out set, seed 1: 0.733 -> 1.000 of them found first)."""
    from ris.search import copies
    from ris.search.verify import MIN_INLIERS

    classes = ("watch", "revolver", "accordion", "airplanes", "llama", "wheelchair", "sea_horse", "pyramid")
    originals = [f for cls in classes for f in caltech_files(cls, 5)]
    made = [edits.edit("pixelate", open_image(read_file(str(f))), edits.rng_for(1, "pixelate", i), None)
            for i, f in enumerate(originals)]  # fmt: skip
    with Collection.open_or_create(tmp_path / "c.ris") as c:
        c.index(originals + caltech_files("BACKGROUND_Google", 200))
        found = [Path(r.matches[0].path) for r in c.search_many(made, k=5)]
        monkeypatch.setattr(copies, "overrules", lambda head, match: head >= MIN_INLIERS)  # any confirmation, as before
        before = [Path(r.matches[0].path) for r in c.search_many(made, k=5)]
    hits, hits_before = (sum(a == b for a, b in zip(got, originals, strict=True)) for got in (found, before))
    assert hits >= len(originals) - 1 and hits > hits_before + 3, (hits, hits_before)  # 40 and 32 here


def test_a_zoomed_cut_is_confirmed_by_the_query_at_half_size(coll: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    """A square cut of 55-75% of a picture's short side enlarged to 1,080 px (a feed's zoom) is ~4x its original's
    scale at verification's working size, past ORB's pyramid; the query's keypoints at half size match its original
    (full Caltech-101, unseen set, square zooms found first, seeds 0-2: 0.82 / 0.65 / 0.67 -> 0.87 / 0.70 / 0.78; here 23
    -> 27 of 30 confirmed)."""
    from ris.search import verify

    picked, made = _copies(coll, "square_zoom", 30)

    def counts(halved: bool) -> list[int]:
        return [coll.ranker.verifier.counts(verify.query_views(verify.working_size(q), halved=halved)[0], [r.path])[0]
                for r, q in zip(picked, made, strict=True)]  # fmt: skip

    confirmed, before = (sum(n >= verify.MIN_INLIERS for n in counts(h)) for h in (True, False))
    found = sum(r.matches[0].id == p.id for r, p in zip(coll.search_many(made, k=5), picked, strict=True))
    monkeypatch.setattr(verify, "HALVED_FROM", 10**6)
    found_before = sum(r.matches[0].id == p.id for r, p in zip(coll.search_many(made, k=5), picked, strict=True))
    assert confirmed >= before + 2 and found >= found_before, (confirmed, before, found, found_before)


def test_a_picture_pasted_over_another_indexed_one_comes_second(coll: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two indexed pictures in one: one pasted at 35% of the side onto the other, enlarged. Where keypoints confirm the
    background first, the pasted picture's region is left unexplained by it (verify.unexplained), and its crops'
    search (Ranker._crop_look) brings the pasted picture second; without that look it was not in the 5 results.
    Indexed images searched again leave nothing unexplained: no crop look, no cost."""
    import io

    from ris.search import ranking, verify

    rows = coll.catalog.all_rows()
    rng = np.random.default_rng(11)
    pairs = [tuple(rows[i] for i in rng.choice(len(rows), 2, replace=False)) for _ in range(16)]

    def pasted_over(bg_row, pic_row) -> Image.Image:
        pic, bg = open_image(read_file(pic_row.path)), open_image(read_file(bg_row.path))
        side = max(pic.size) / 0.35
        bg = bg.resize((round(bg.width * side / max(bg.size)), round(bg.height * side / max(bg.size))), Image.Resampling.LANCZOS)
        if pic.width > bg.width or pic.height > bg.height:
            f = 0.95 * min(bg.width / pic.width, bg.height / pic.height)
            pic = pic.resize((round(pic.width * f), round(pic.height * f)))
        bg.paste(pic, (int(rng.integers(0, bg.width - pic.width + 1)), int(rng.integers(0, bg.height - pic.height + 1))))
        data = io.BytesIO()
        bg.save(data, "JPEG", quality=80)
        return Image.open(io.BytesIO(data.getvalue())).convert("RGB")

    queries = [pasted_over(a, b) for a, b in pairs]

    def ranks() -> list[tuple[bool, int]]:
        """(the background first, the pasted picture's rank or 0) for each query."""
        out = []
        for (a, b), result in zip(pairs, coll.search_many(queries, 5), strict=True):
            ids = [m.id for m in result.matches]
            out.append((ids[0] == a.id, ids.index(b.id) + 1 if b.id in ids else 0))
        return out

    looked: list[bool] = []
    real = verify.unexplained

    def counted(*args) -> list[bool]:
        looked.append(any(boxes := real(*args)))
        return boxes

    monkeypatch.setattr(verify, "unexplained", counted)
    found = ranks()
    behind = [rank for first, rank in found if first]
    assert behind and all(rank == 2 for rank in behind), found  # the background first, the pasted one second
    assert sum(rank > 0 for _, rank in found) >= 15, found
    looked.clear()
    coll.search_many([r.path for r in rows[::25]], 5)
    assert looked and not any(looked), "an indexed image searched again leaves a region unexplained"
    monkeypatch.setattr(ranking.Ranker, "_crop_look", lambda *a, **k: None)
    without = ranks()
    assert sum(rank > 0 for _, rank in without) < sum(rank > 0 for _, rank in found), without


def test_keypoint_votes_point_at_the_original_of_a_turned_copy(coll: Collection) -> None:
    """The indexed images' descriptors in one inverted file (ris.search.votes): a copy turned by tens of degrees and
    rescaled votes for its original most, whatever its CNN vector; an image removed votes no more, one added does."""
    from ris.search.verify import Verifier, query_views, working_size
    from ris.search.votes import KeypointVotes

    rows, verifier, votes = coll.catalog.all_rows(), Verifier(), KeypointVotes()
    assert votes.best(query_views(working_size(open_image(read_file(rows[0].path))))[0], 5) == []  # not built yet
    votes.build([(r.id, verifier.keypoints(r.path)) for r in rows])
    assert votes.covers(len(rows)) and not votes.covers(len(rows) + 1)
    assert votes.worth(2 * len(rows)) and not votes.worth(2 * len(rows) + 1)  # asked while they hold half the images
    picked, made = _copies(coll, "rotate_scale")
    seen = [query_views(working_size(img))[0] for img in made]
    firsts = [[i for i, _ in votes.best(views_, 1, threads=2)] for views_ in seen]
    assert sum(first == [row.id] for first, row in zip(firsts, picked, strict=True)) >= 10, (firsts, picked)
    votes.remove([picked[0].id])
    assert picked[0].id not in dict(votes.best(seen[0], 20)) and not votes.covers(len(rows))
    votes.add(picked[0].id, verifier.keypoints(picked[0].path))
    assert [i for i, _ in votes.best(seen[0], 1)] == firsts[0] and votes.covers(len(rows))


def test_kept_keypoints_vote_for_the_copies_the_second_look_sought(coll: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the indexed images' keypoints are kept (as `ris serve` keeps them), the images sharing most keypoints with
    a query are verified wherever its CNN vector lands (here: anywhere at all, and no second look), and the second
    look's own views are not made, since the votes find what they found (full Caltech-101, harsh set seed 5: recall@5
    0.946 -> 0.972, an outside query served p50 54-56 -> 47-51 ms); a collection grown past the votes gets them back."""
    from ris.search.verify import Verifier

    rows = coll.catalog.all_rows()
    picked = [rows[i] for i in np.random.default_rng(5).choice(len(rows), 16, replace=False)]
    queries = [edits.rotated(open_image(read_file(row.path)), 50 + 10 * (i % 4)) for i, row in enumerate(picked)]
    lost = np.random.default_rng(0).normal(size=(len(queries), coll.manifest.dims)).astype(np.float32)
    lost /= np.linalg.norm(lost, axis=1, keepdims=True)  # CNN vectors that point nowhere near the originals
    outside = [open_image(read_file(str(f))) for f in caltech_files("watch", 3)]  # copies of nothing indexed
    own: list[int] = []
    real_own = views.own_views
    monkeypatch.setattr(views, "own_views", lambda img: own.append(1) or real_own(img))

    def found() -> int:
        own.clear()
        coll.search_many(outside, 5)
        results = coll.ranker.search(lost, 5, ["<turned>"] * len(queries), 0, None, queries, 2)  # no model: no second look
        return sum(r.matches[0].id == row.id for r, row in zip(results, picked, strict=True))

    monkeypatch.setattr(coll.ranker, "_verifier", Verifier())  # this test's keypoints: the module's searches keep theirs
    looked = found()
    assert own  # the second look turned and cut the queries nothing confirmed
    assert coll.ranker.keep_keypoints(threads=2) == len(rows)
    voted = found()
    assert voted >= 11 and voted > looked + 5 and not own, (voted, looked, own)
    coll.ranker.verifier.votes.remove([picked[0].id])  # as if added since the votes were built: not covered
    found()
    assert own


def test_a_photo_on_its_side_finds_its_original_first(coll: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    """A photo whose EXIF orientation was lost (a messaging app's copy, an export, a scan) stands on its side or upside
    down, its CNN vector far from its original's. The second look's quarter turns find its original: the image
    nearer a turned query than any is to the query as it stands is verified, besides the other views' candidates
    (full Caltech-101, 60 photos a turn, searched alone: recall@1 0.72-0.75 -> 0.88-0.95), while a photo of nothing
    indexed rarely has such an image and costs rarely a verification more. With the keypoint votes, the original confirmed by
    hundreds of matches goes before a look-alike confirmed by a few (0.88-0.95 -> 0.95-0.98)."""
    from ris.search.ranking import Ranker
    from ris.search.verify import Verifier

    rows = coll.catalog.all_rows()
    picked = [rows[i] for i in np.random.default_rng(11).choice(len(rows), 18, replace=False)]
    turns = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
    queries = [edits.jpeg(open_image(read_file(row.path)).transpose(turns[i % 3]), 80) for i, row in enumerate(picked)]
    outside = [open_image(read_file(str(f))) for f in caltech_files("watch", 6)]  # photos of nothing indexed
    lost = np.random.default_rng(1).normal(size=(len(queries), coll.manifest.dims)).astype(np.float32)
    lost /= np.linalg.norm(lost, axis=1, keepdims=True)  # CNN vectors nowhere near the originals: the second look runs
    extra: dict[int, list[int]] = {}  # query -> the images its quarter turns choose, whatever the other views chose
    verified: dict[int, list[int]] = {}  # ... and those they add to the other views' candidates
    real = Ranker._turned

    def spy(self: Ranker, v, q: int, turned: np.ndarray, nearest: np.ndarray, rows: dict, taken: set[int]) -> list:
        extra[q] = [row.id for row in real(self, v, q, turned, nearest, rows, set())]
        added = real(self, v, q, turned, nearest, rows, taken)
        verified[q] = [row.id for row in added]
        return added

    monkeypatch.setattr(Ranker, "_turned", spy)
    monkeypatch.setattr(coll.ranker, "_verifier", Verifier())  # this test's keypoints: the module's searches keep theirs

    results = coll.ranker.search(lost, 5, ["<turned>"] * len(queries), 0, None, queries, 2, coll.embed)
    assert sum(row.id in extra.get(q, []) for q, row in enumerate(picked)) >= 16, extra
    assert sum(r.matches[0].id == row.id for r, row in zip(results, picked, strict=True)) >= 16
    verified.clear()
    coll.search_many(outside, 5)
    assert len(verified) >= 3 and sum(map(bool, verified.values())) <= len(verified) // 3, verified  # rarely one more
    # (full Caltech-101's 832 held-out *9.jpg: 619 second looks, 26 of them verified 1.7 images more)

    def first() -> int:
        return sum(r.matches[0].id == row.id for r, row in zip(coll.search_many(queries, 5), picked, strict=True))

    assert first() >= 17
    coll.ranker.keep_keypoints(threads=2)
    assert first() >= 17


def test_two_indexed_pictures_side_by_side_both_come_first(coll: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two indexed pictures joined side by side (a gap between them or none) or one above the other: the query is split
    where a straight line crosses it whole (views.tiles), and its tiles are searched, so both pictures come in the 5
    results. Without the tiles, the second picture was often missing from them (full Caltech-101, 60 pairs: recall@5
    of the picture asked for 0.60 -> 0.88 one-off). A picture alone is not split."""

    rows = coll.catalog.all_rows()
    rng = np.random.default_rng(5)
    pairs = [tuple(rows[i] for i in rng.choice(len(rows), 2, replace=False)) for _ in range(12)]

    def joined(a_row, b_row, i: int) -> Image.Image:
        pics = [open_image(read_file(r.path)).convert("RGB") for r in (a_row, b_row)]
        return edits.jpeg(edits.in_row(pics, i % 3 != 2, (12, 0, 0)[i % 3], (255, 255, 255)), 80)

    queries = [joined(a, b, i) for i, (a, b) in enumerate(pairs)]

    def both_found() -> int:
        results = coll.search_many(queries, 5)
        return sum({a.id, b.id} <= {m.id for m in r.matches} for (a, b), r in zip(pairs, results, strict=True))

    split = [len(views.pasted(q).tiles) >= 2 for q in queries]
    assert sum(split) >= 10, split
    found = both_found()
    assert found >= 10, found
    alone = [open_image(read_file(r.path)) for r in rows[::30]]
    assert sum(bool(views.pasted(img).tiles) for img in alone) <= 1, "pictures alone split"
    monkeypatch.setattr(views, "tiles", lambda grey, lines: [])
    without = both_found()
    assert without < found - 2, without


def test_three_pictures_in_a_row_all_come_in_the_five(coll: Collection, monkeypatch: pytest.MonkeyPatch) -> None:
    """A triptych of indexed pictures: each tile's confirmed picture takes a place after the first result (one less
    than the tiles), so all three come in the 5 results. With one runner-up place, as for any other query, the third
    was missing (full Caltech-101, joined set: triptych recall@5 0.58 / 0.55 -> 0.75 / 0.80, seeds 1 / 2)."""
    from ris.search import ranking

    rows = coll.catalog.all_rows()
    rng = np.random.default_rng(8)
    trios = [[rows[i] for i in rng.choice(len(rows), 3, replace=False)] for _ in range(12)]

    def row_of(trio) -> Image.Image:
        pics = [open_image(read_file(r.path)).convert("RGB") for r in trio]
        return edits.jpeg(edits.in_row(pics, True, 8, (0, 0, 0)), 85)

    queries = [row_of(trio) for trio in trios]

    def all_found() -> int:
        results = coll.search_many(queries, 5)
        return sum({r.id for r in trio} <= {m.id for m in res.matches} for trio, res in zip(trios, results, strict=True))

    found = all_found()
    assert found >= 5, found  # 6 of 12 on 300 images (Intel Xeon, 2026-12-08)
    real = ranking._runners_up
    monkeypatch.setattr(ranking, "_runners_up", lambda checked, first, places=1: real(checked, first, 1))
    without = all_found()
    assert without < found - 2, without  # 2
