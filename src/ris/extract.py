"""The batched extraction pipeline: decode workers feed the model, each stage timed.

Worker processes read, hash and decode files while the main process runs the model on the previous
batch (ONNX Runtime and PyTorch release the GIL). At most `prefetch` batches are decoded ahead, so
memory stays bounded whatever the number of images.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .decode import decode_bytes, decode_file, decode_jpegs_on_device, read_file
from .errors import DecodeError


@dataclass
class StageTimes:
    """Seconds spent per stage (decode is summed over workers), and how long the model waited."""

    decode: float = 0.0
    model: float = 0.0
    write: float = 0.0
    wait: float = 0.0
    images: int = 0
    extracted: int = 0
    skipped: int = 0
    wall: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass
class Batch:
    """One batch's outcome: decoded images (id, sha, pixels) and failures (id, reason)."""

    ok: list[tuple[int, str, np.ndarray]] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)


def _decode_job(job: tuple[int, str, int]) -> tuple[int, str | None, np.ndarray | None, str | None, float]:
    image_id, path, size = job
    start = time.perf_counter()
    try:
        decoded = decode_file(path, size)
        return image_id, decoded.sha256, decoded.pixels, None, time.perf_counter() - start
    except DecodeError as exc:
        return image_id, None, None, str(exc), time.perf_counter() - start
    except Exception as exc:  # a decoder bug must not abort a million-image run
        return image_id, None, None, f"decode failed: {type(exc).__name__}: {exc}", time.perf_counter() - start


def _read_job(job: tuple[int, str, int]) -> tuple[int, str | None, bytes | None, str | None, float]:
    """For GPU decoding: workers only read and hash; pixels are made on the device."""
    image_id, path, _ = job
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


def default_workers(threads: int) -> int:
    """Decode processes: one per two cores beside the model (decoding is ~1 ms/img, the model more)."""
    return max(1, threads // 2)


def decoded_batches(
    items: Sequence[tuple[int, str]], size: int, batch_size: int, workers: int, times: StageTimes, prefetch: int = 3,
    job: Callable = _decode_job,
) -> Iterator[Batch]:
    """Decoded batches in input order; decoding runs `prefetch` batches ahead in `workers` processes."""
    jobs = [(image_id, path, size) for image_id, path in items]
    chunks = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]

    def collect(results: list) -> Batch:
        batch = Batch()
        for image_id, sha, pixels, error, seconds in results:
            times.decode += seconds
            if error is None:
                batch.ok.append((image_id, sha, pixels))
            else:
                batch.failed.append((image_id, error))
        return batch

    if workers <= 0 or len(jobs) <= batch_size:
        for chunk in chunks:
            yield collect([job(j) for j in chunk])
        return
    # fork: workers start in milliseconds and need no `if __name__ == "__main__"` guard in user
    # scripts; they only run PIL/numpy, never the parent's model threads.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers) as pool:
        pending: deque = deque()
        next_chunk = 0
        while next_chunk < len(chunks) or pending:
            while next_chunk < len(chunks) and len(pending) < prefetch:
                pending.append(pool.map_async(job, chunks[next_chunk], chunksize=8))
                next_chunk += 1
            start = time.perf_counter()
            results = pending.popleft().get()
            times.wait += time.perf_counter() - start
            yield collect(results)


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

    Files whose content hash `known` already has are not run through the model again.
    """
    times = StageTimes(images=len(items))
    wall = time.perf_counter()
    device = getattr(extractor, "device", "cpu")
    on_device = device != "cpu" and getattr(extractor, "decode_on_device", False)
    job = _read_job if on_device else _decode_job
    for batch in decoded_batches(items, input_size, batch_size, workers, times, job=job):
        have = known([sha for _, sha, _ in batch.ok])
        todo: dict[str, np.ndarray | bytes] = {}
        for _, sha, payload in batch.ok:
            if sha not in have:
                todo.setdefault(sha, payload)
        features: dict[str, np.ndarray] = {}
        if todo:
            start = time.perf_counter()
            if on_device:
                shas, pixels, failures = _device_inputs(todo, input_size, device)
                if failures:
                    batch.failed += [(i, failures[sha]) for i, sha, _ in batch.ok if sha in failures]
                    batch.ok = [item for item in batch.ok if item[1] not in failures]
            else:
                shas, pixels = list(todo), np.stack(list(todo.values()))
            out = extractor(pixels) if pixels is not None else []
            times.model += time.perf_counter() - start
            features = dict(zip(shas, out, strict=True))
        start = time.perf_counter()
        on_batch(batch, features)
        times.write += time.perf_counter() - start
        times.extracted += len(features)
        times.skipped += len(batch.failed)
        if progress:
            progress(len(batch.ok) + len(batch.failed))
    times.wall = time.perf_counter() - wall
    return times
