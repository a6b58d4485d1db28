"""Small parallel work on the caller's thread and one shared pool: verification's candidates, a query's projection.

OpenCV, Pillow's decoders and single-threaded BLAS release the GIL, so a few threads of our own run such work side
by side; one pool started once serves every caller (starting threads per call cost more than the work).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager


def cpu_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


#: Threads kept for `on_threads`, started once: starting two threads a call cost ~9 ms a served query (1.7 ms each
#: on a 2-core VM). Work run on them does its own `on_threads` inline, so nesting never waits for a free thread.
_pool: ThreadPoolExecutor | None = None
_pool_guard = threading.Lock()
_worker = threading.local()


def _mark_worker() -> None:
    _worker.active = True


def _shared_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_guard:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, cpu_threads() - 1), "ris-threads", initializer=_mark_worker)
        return _pool


def on_threads(fn: Callable, items: Sequence, threads: int) -> list:
    """fn over items, in order, on up to `threads` threads: the caller's and the shared pool's (OpenCV and Pillow's
    decoders release the GIL). Each thread takes the next item when it is free."""
    n = min(threads, len(items))
    if n <= 1 or getattr(_worker, "active", False):
        return [fn(item) for item in items]
    out: list = [None] * len(items)
    todo = iter(enumerate(items))
    guard, failed = threading.Lock(), threading.Event()

    def work() -> None:
        while not failed.is_set():
            with guard:
                nxt = next(todo, None)
            if nxt is None:
                return
            try:
                out[nxt[0]] = fn(nxt[1])
            except BaseException:
                failed.set()  # the others stop at their next item
                raise

    helpers = [_shared_pool().submit(work) for _ in range(n - 1)]
    try:
        work()
    finally:  # every item is taken: a helper not started yet has nothing left to do; wait for the others
        running = [helper for helper in helpers if not helper.cancel()]
        for helper in running:
            helper.exception()
    for helper in running:
        helper.result()  # a helper's error, raised here
    return out


@contextmanager
def faiss_alone() -> Iterator[None]:
    """FAISS on the calling thread alone (OpenMP's setting is each thread's own): work spread over our own threads,
    or run at the lowest priority, must not start OpenMP's threads too (from a pool thread, where a server searches,
    OpenMP's two threads ran a binary inverted file's search no faster than one: 8.1 vs 7.9 ms)."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)
