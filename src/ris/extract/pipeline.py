"""The batched extraction pipeline: decode workers feed the model, each stage timed.

Worker processes read, hash and decode files into shared memory while the main thread runs the
model (ONNX Runtime and PyTorch release the GIL) and a writer thread commits finished batches. A
bounded number of batches is in flight at each stage, so memory stays bounded whatever the number of
images.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import mmap
import multiprocessing as mp
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..errors import DecodeError
from ..images import signature
from ..images.decode import decode_bytes, decode_file, decode_jpegs_on_device, read_file


@dataclass(frozen=True)
class ModelSettings:
    """What an extraction engine needs to run a collection's model anywhere (this process or a cluster node).

    Engines (the local pipeline below, `ris.extract.ray` on Ray) receive this and a `Sink`, never the
    Collection: they read files and produce features; the collection decides what to keep.
    """

    model: str
    pooling: str
    precision: str
    weights: str | None  # a weights file (vgg16); None: the bundled/cached weights
    weights_sha256: str
    input_size: int
    raw_dims: int
    cpu_runtime: str


class Sink(Protocol):
    """Where an engine delivers its results; the collection implements it (one transaction per call)."""

    def known(self, hashes: Sequence[str]) -> set[str]:
        """The content hashes among these whose features are already kept (not run through the model again)."""
        ...

    def commit(self, done: Sequence[tuple[int, str]], features: dict[str, np.ndarray], failed: Sequence[tuple[int, str]],
               signatures: dict[str, np.ndarray] | None = None) -> None:  # fmt: skip
        """Images extracted (id, sha), the new features by sha, images that failed (id, reason), and the new
        contents' signatures by sha (ris.images.signature, made from the same model input)."""
        ...


@dataclass
class StageTimes:
    """Seconds spent per stage (decode is summed over workers), and how long the model waited."""

    decode: float = 0.0
    model: float = 0.0
    write: float = 0.0
    wait: float = 0.0  # the model waiting for decoded batches
    backlog: float = 0.0  # the model waiting for the writer (its queue full)
    images: int = 0
    extracted: int = 0
    skipped: int = 0
    wall: float = 0.0
    # on Ray: images decoded and run through the model per node ("IP node-id"), {"decoded": n, "extracted": m}
    nodes: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass
class IndexReport:
    """What one `index`/`add` run did."""

    scanned: int
    new: int
    changed: int
    removed: int
    extracted: int
    skipped: int
    images: int
    times: StageTimes
    skipped_files: list[dict[str, str]]
    ignored: int = 0  # non-image files (sidecars, videos, documents) not tried, by extension
    ignored_types: dict[str, int] = field(default_factory=dict)  # how many of each extension
    raw_beside_image: int = 0  # camera RAW files left out for the image of the same name beside them


@dataclass
class Batch:
    """One batch's outcome: decoded images (id, sha) with their stacked pixels, and failures (id, reason).

    `pixels` is one uint8 (n, size, size, 3) array aligned with `ok` (a view of the shared slot the
    decode workers wrote it into), or the files' bytes when the GPU decodes them; `signatures` the new
    contents' signatures by sha, made from those pixels before they are dropped.
    """

    ok: list[tuple[int, str]] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    pixels: Any = None
    signatures: dict[str, np.ndarray] = field(default_factory=dict)


#: Shared memory the decode workers write pixels into, per running pipeline: (slots, batch_size, size,
#: size, 3) uint8 in an anonymous shared mapping made before the workers fork (no /dev/shm file, no
#: pickling of pixels).
_SLOTS: dict[int, np.ndarray] = {}


def _decode_job(job: tuple) -> tuple[int, str | None, np.ndarray | None, str | None, float]:
    """(id, path, size[, run, slot, row]) -> (id, sha, pixels or None when written to _SLOTS[run][slot, row],
    error, seconds)."""
    image_id, path, size = job[:3]
    start = time.perf_counter()
    try:
        slotted = len(job) == 6
        decoded = decode_file(path, size, _SLOTS[job[3]][job[4], job[5]] if slotted else None)
        return image_id, decoded.sha256, None if slotted else decoded.pixels, None, time.perf_counter() - start
    except DecodeError as exc:
        return image_id, None, None, str(exc), time.perf_counter() - start
    except Exception as exc:  # a decoder bug must not abort a million-image run
        return image_id, None, None, f"decode failed: {type(exc).__name__}: {exc}", time.perf_counter() - start


#: glibc's mallopt parameters, and what a decode process sets them to: blocks under 4 MB (a decoded photo, its
#: resized copy, a file's bytes) come from a heap that keeps up to 64 MB free instead of being mapped and unmapped
#: each time (each mapping's pages faulted in and zeroed anew). Full Caltech-101 decoded by one worker (AMD EPYC
#: Zen 4): 23k page faults instead of 47k; with read_file's exact reads, 0.59 ms an image instead of 0.65.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
DECODER_HEAP = {_M_MMAP_THRESHOLD: 4 << 20, _M_TRIM_THRESHOLD: 64 << 20}


@functools.cache
def decoder_process() -> None:
    """Tune this process's allocator for decoding (DECODER_HEAP); once a process, where glibc runs it (a no-op
    elsewhere). Called by the decode workers, never by a caller's process: a server's heap stays as it is."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    for param, value in DECODER_HEAP.items():
        mallopt(param, value)


def _read_job(job: tuple) -> tuple[int, str | None, bytes | None, str | None, float]:
    """For GPU decoding: workers only read and hash; pixels are made on the device."""
    image_id, path = job[:2]
    start = time.perf_counter()
    try:
        data = read_file(path)
        if not data:
            raise DecodeError("empty file")
        return image_id, hashlib.sha256(data).hexdigest(), data, None, time.perf_counter() - start
    except DecodeError as exc:
        return image_id, None, None, str(exc), time.perf_counter() - start


def _device_inputs(todo: dict[str, bytes], size: int, device: str):
    """(shas, uint8 NHWC tensor on the device, {sha: reason} for files no decoder could read)."""
    import torch

    shas = list(todo)
    on_device, positions = decode_jpegs_on_device([todo[s] for s in shas], size, device)
    done = set(positions)
    cpu_shas, cpu_pixels, failures = [], [], {}
    for i, sha in enumerate(shas):
        if i not in done:  # other formats and JPEGs nvJPEG refused: the CPU decoder decides
            try:
                cpu_pixels.append(decode_bytes(todo[sha], size).pixels)
                cpu_shas.append(sha)
            except DecodeError as exc:
                failures[sha] = str(exc)
    parts, order = [], []
    if on_device is not None:
        parts.append(on_device)
        order += [shas[i] for i in positions]
    if cpu_pixels:
        parts.append(torch.from_numpy(np.stack(cpu_pixels)).to(device))
        order += cpu_shas
    return order, (torch.cat(parts) if parts else None), failures


def signature_of(pixels: Any) -> np.ndarray:
    """Signatures of a batch's model input: a uint8 array, or a tensor on the GPU."""
    return signature.of_pixels(pixels) if isinstance(pixels, np.ndarray) else signature.of_tensor(pixels)


def default_workers(threads: int, device: str = "cpu") -> int:
    """Decode processes for a model on `device` with `threads` cores.

    On the CPU one a core, beside the model's threads: which of the two bounds a run depends on the photos. A
    camera's 12-MP JPEG takes ~26 ms a core to decode where the model takes ~3.7 (240 such photos on 2 cores, AMD
    Zen 4: 58 img/s with 2 workers, 38 with 1); Caltech-101's small images take ~0.6 ms, and a second worker then
    mostly waits (the whole run 27.2-29.1 s against 28.5-29.1 with 1). With the model on a GPU every core but the
    two that feed it and commit, for decoding is then the bound (a stand-in model on a 16-core H200 host: 8,840
    img/s with 14 workers, 4,440 with 7)."""
    return max(1, threads if device == "cpu" else threads - 2)


def _assemble(results: list, slot: np.ndarray | None, times: StageTimes) -> Batch:
    """A Batch from one chunk's job results; pixels are a view of the slot when every file decoded."""
    batch = Batch()
    rows, payloads = [], []
    for row, (image_id, sha, payload, error, seconds) in enumerate(results):
        times.decode += seconds
        if error is None:
            batch.ok.append((image_id, sha))
            rows.append(row)
            payloads.append(payload)
        else:
            batch.failed.append((image_id, error))
    if not rows:
        return batch
    if isinstance(payloads[0], bytes):
        batch.pixels = payloads  # for the GPU's decoder
    elif payloads[0] is not None:
        batch.pixels = np.stack(payloads)
    elif len(rows) == len(results):
        batch.pixels = slot[: len(rows)]
    else:
        batch.pixels = slot[rows]
    return batch


def decoded_batches(
    items: Sequence[tuple[int, str]],
    size: int,
    batch_size: int,
    workers: int,
    times: StageTimes,
    prefetch: int = 3,
    job: Callable = _decode_job,
    register: Callable[[np.ndarray], Callable[[], None]] | None = None,
) -> Iterator[Batch]:
    """Decoded batches in input order; decoding runs `prefetch` batches ahead in `workers` processes.

    Workers write pixels into shared slots and send back only ids, hashes and errors: pickling ~150 kB
    per image through a pipe capped a 14-process pool at ~3,800 img/s on a GPU host. Slots are reused in
    a ring: a yielded batch's pixels stay valid until the consumer asks for the third batch after it.
    `register` (a GPU extractor's register_host_memory) page-locks the slots for asynchronous copies.
    """
    jobs = [(image_id, path, size) for image_id, path in items]
    chunks = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    if workers <= 0 or len(jobs) <= batch_size:
        for chunk in chunks:
            yield _assemble([job(j) for j in chunk], None, times)
        return
    nslots = prefetch + 2
    kept = _take_workers(workers, nslots, batch_size, size, slotted=job is _decode_job)
    slots = kept.slots
    release = register(slots) if register is not None and slots is not None else lambda: None
    finished = False
    try:
        pending: deque = deque()
        next_chunk = 0
        while next_chunk < len(chunks) or pending:
            while next_chunk < len(chunks) and len(pending) < prefetch:
                slot, chunk = next_chunk % nslots, chunks[next_chunk]
                if slots is not None:
                    chunk = [(*j, id(slots), slot, row) for row, j in enumerate(chunk)]
                pending.append((slot, kept.pool.map_async(job, chunk, chunksize=8)))
                next_chunk += 1
            slot, result = pending.popleft()
            start = time.perf_counter()
            results = result.get()
            times.wait += time.perf_counter() - start
            yield _assemble(results, None if slots is None else slots[slot], times)
        finished = True
    finally:
        release()
        _return_workers(kept, finished)


@dataclass
class _Workers:
    """Decode processes and the shared slots they write pixels into (fork only), kept between runs."""

    key: tuple
    pool: Any
    slots: np.ndarray | None
    busy: bool = True


#: The pool a finished run left for the next one in this process. Forking costs little at once, but every
#: page the parent then writes while the children live is copied on that write: a warm model's buffers
#: cost its first batch after each fork ~0.15 s (OpenVINO Lite0, batch 32), a tenth of a 1% add to a 27k
#: collection through the API. Kept, the pool is forked once a process (a server, a notebook).
_KEPT: _Workers | None = None
_KEPT_LOCK = threading.Lock()


def _take_workers(workers: int, nslots: int, batch_size: int, size: int, slotted: bool) -> _Workers:
    """The kept pool when it fits and is free, else a new one (kept afterwards if none is)."""
    global _KEPT
    # fork: workers start in milliseconds, inherit the slots and need no `if __name__ == "__main__"`
    # guard in user scripts; they only run PIL/numpy, never the parent's model threads.
    fork = "fork" in mp.get_all_start_methods()
    key = (workers, nslots, batch_size, size, slotted and fork)
    with _KEPT_LOCK:
        if _KEPT is not None and _KEPT.key == key and not _KEPT.busy:
            _KEPT.busy = True
            return _KEPT
    slots = None
    if key[-1]:  # spawned workers would not inherit the mapping: pixels are pickled
        shared = mmap.mmap(-1, nslots * batch_size * size * size * 3)  # MAP_SHARED | MAP_ANONYMOUS
        slots = np.frombuffer(shared, np.uint8).reshape(nslots, batch_size, size, size, 3)
        _SLOTS[id(slots)] = slots  # inherited by the workers (and by any the pool re-forks)
    return _Workers(key, mp.get_context("fork" if fork else "spawn").Pool(workers, decoder_process), slots)


def _return_workers(used: _Workers, finished: bool) -> None:
    """Keep a pool whose run consumed every result (none of its workers still writes a slot); end others."""
    global _KEPT
    with _KEPT_LOCK:
        keep = finished and (_KEPT is None or _KEPT is used or not _KEPT.busy)
        if keep:
            if _KEPT is not None and _KEPT is not used:
                _end_workers(_KEPT)
            used.busy, _KEPT = False, used
            return
        if _KEPT is used:
            _KEPT = None
    _end_workers(used)


def _end_workers(workers: _Workers) -> None:
    workers.pool.terminate()
    workers.pool.join()
    if workers.slots is not None:
        _SLOTS.pop(id(workers.slots), None)


@atexit.register
def _end_kept_workers() -> None:
    """Before multiprocessing's own exit handler (atexit runs last-registered first)."""
    global _KEPT
    with _KEPT_LOCK:
        kept, _KEPT = _KEPT, None
    if kept is not None:
        _end_workers(kept)


class _Writer:
    """Commits batches on a thread of its own, in order, so the model never waits for SQLite.

    Batches that queued up while a commit ran are committed together in one transaction (fewer,
    larger commits when the writer falls behind). At most `depth` batches wait; the first error stops
    the writer and is raised in the caller's thread.
    """

    def __init__(self, on_batch: Callable[[Batch, dict[str, np.ndarray]], None], times: StageTimes, depth: int = 4):
        self.on_batch, self.times = on_batch, times
        self.queue: queue.Queue = queue.Queue(depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="ris-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        done = False
        while not done:
            items = [self.queue.get()]
            while items[-1] is not None and not self.queue.empty():
                items.append(self.queue.get())
            done = items[-1] is None
            items = [item for item in items if item is not None]
            if items and self.error is None:
                try:
                    start = time.perf_counter()
                    self.on_batch(*_merge(items))
                    self.times.write += time.perf_counter() - start
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    self.error = exc

    def put(self, batch: Batch, features: dict[str, np.ndarray]) -> None:
        self._raise()
        start = time.perf_counter()
        self.queue.put((batch, features))
        self.times.backlog += time.perf_counter() - start

    def close(self, failed: bool = False) -> None:
        """Commit what is queued and stop; a writer error is raised unless the caller is failing already."""
        self.queue.put(None)
        self.thread.join()
        if not failed:
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


def _merge(items: list[tuple[Batch, dict[str, np.ndarray]]]) -> tuple[Batch, dict[str, np.ndarray]]:
    if len(items) == 1:
        return items[0]
    batch, features = Batch(), {}
    for part, feats in items:
        batch.ok += part.ok
        batch.failed += part.failed
        batch.signatures.update(part.signatures)
        features.update(feats)
    return batch, features


def _submit(extractor: Callable, pixels: Any) -> Callable[[], np.ndarray]:
    """Start the model on a batch; the returned call waits for its features. GPUs and OpenVINO's streams run
    asynchronously: the next batches are submitted before this one's features are fetched (the extractor's
    `in_flight` batches at once, default 2)."""
    submit = getattr(extractor, "submit", None)
    if submit is not None:
        return submit(pixels)
    out = extractor(pixels)
    return lambda: out


def _new_work(batch: Batch, have: set[str]) -> tuple[list[str], Any]:
    """The shas to run through the model (first occurrence, not known) and their pixels."""
    first: dict[str, int] = {}
    for pos, (_, sha) in enumerate(batch.ok):
        if sha not in have:
            first.setdefault(sha, pos)
    rows = list(first.values())
    if isinstance(batch.pixels, np.ndarray) and len(rows) < len(batch.ok):
        return list(first), batch.pixels[rows]
    if isinstance(batch.pixels, list):
        return list(first), [batch.pixels[r] for r in rows]
    return list(first), batch.pixels


def run(
    items: Sequence[tuple[int, str]],
    extractor: Callable[[np.ndarray], np.ndarray],
    input_size: int,
    on_batch: Callable[[Batch, dict[str, np.ndarray]], None],
    known: Callable[[list[str]], set[str]] = lambda hashes: set(),
    batch_size: int = 32,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> StageTimes:
    """Extract features for `items` (id, path); `on_batch` stores each batch (new features by sha).

    Three things overlap: decode workers prepare the next batches, the model runs on this one (on a
    GPU, asynchronously: the next batch is submitted before this one's features are fetched), and a
    writer thread commits the previous one (`on_batch` runs on that thread). Files whose content hash
    `known` has, or that this run already extracted, are not run through the model again.
    """
    times = StageTimes(images=len(items))
    wall = time.perf_counter()
    device = getattr(extractor, "device", "cpu")
    on_device = device != "cpu" and getattr(extractor, "decode_on_device", False)
    job = _read_job if on_device else _decode_job
    extracted: set[str] = set()
    writer = _Writer(on_batch, times)
    pending: deque[tuple[Batch, list[str], Callable[[], np.ndarray]]] = deque()
    in_flight = max(2, getattr(extractor, "in_flight", 2))  # batches submitted and not yet fetched

    def finish(batch: Batch, shas: list[str], result: Callable[[], np.ndarray]) -> None:
        start = time.perf_counter()
        features = dict(zip(shas, result(), strict=True)) if shas else {}
        times.model += time.perf_counter() - start
        writer.put(batch, features)
        times.extracted += len(features)
        times.skipped += len(batch.failed)
        if progress:
            progress(len(batch.ok) + len(batch.failed))

    try:
        register = getattr(extractor, "register_host_memory", None)
        batches = decoded_batches(items, input_size, batch_size, workers, times, job=job, register=register)
        for batch in batches:
            have = known([sha for _, sha in batch.ok]) | extracted
            shas, pixels = _new_work(batch, have)
            start = time.perf_counter()
            if shas and on_device:
                shas, pixels, failures = _device_inputs(dict(zip(shas, pixels, strict=True)), input_size, device)
                if failures:
                    batch.failed += [(i, failures[sha]) for i, sha in batch.ok if sha in failures]
                    batch.ok = [item for item in batch.ok if item[1] not in failures]
            result = _submit(extractor, pixels) if shas else (lambda: [])
            times.model += time.perf_counter() - start
            if shas:  # on a GPU, while the model runs
                batch.signatures = dict(zip(shas, signature_of(pixels), strict=True))
            extracted.update(shas)
            batch.pixels = None  # features only from here on: the writer does not hold images
            pending.append((batch, shas, result))
            if len(pending) >= in_flight:
                finish(*pending.popleft())
        while pending:
            finish(*pending.popleft())
    except BaseException:
        writer.close(failed=True)
        raise
    writer.close()
    times.wall = time.perf_counter() - wall
    return times
