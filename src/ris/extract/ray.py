"""Extraction on a Ray cluster: the same decode → model → commit pipeline as `extract.run`, scaled out.

Ray Data streams the pending files through CPU decode tasks and a pool of model actors (one per GPU
when the cluster has GPUs). The driver gathers features into shards: a shard holds the images whose
id falls in one `shard_size` range, and its file in C/ray-shards/ is named by a hash of its file list
and the model. A shard is written before it is merged (one `Catalog.commit_batch` transaction), so
after a crash written shards are merged again without recomputing, and merged ones are no longer pending.

Every node must read the image files at the same paths (a shared filesystem) and have ris installed;
only the driver touches the collection.

Two ways to reach a cluster: on one of its nodes (`auto`, `HOST:PORT`) the pipeline runs in this process;
from elsewhere (`ray://HOST:PORT`, Ray Client) it runs in a driver actor on the cluster, since Ray Data's
streaming executor needs a real Ray worker, and finished shards come back to this process to be merged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DecodeError, RisError
from ..files.atomic import replacing
from ..images import signature
from ..vectors.catalog import from_stored
from .pipeline import ModelSettings, Sink, StageTimes

SHARD_DIR = "ray-shards"
LOCAL = "local"
CLIENT = "ray://"  # Ray Client: this process is outside the cluster
DECODE_PROCESS_BYTES = 160 * 2**20
TOKEN_FILE = Path.home() / ".ray" / "auth_token"  # where `ray get-auth-token --generate` writes the token


# --- shards ----------------------------------------------------------------------------------


@dataclass
class Shard:
    """One unit of resumable work: images (id, path) and, once extracted, their outcome."""

    key: int
    items: list[tuple[int, str]]
    name: str = ""
    ids: list[int] = field(default_factory=list)
    shas: list[str] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    signatures: list[np.ndarray] = field(default_factory=list)  # ris.images.signature, aligned with ids
    failed: list[tuple[int, str]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.ids) + len(self.failed) == len(self.items)


def shard_name(identity: str, items: Sequence[tuple[int, str]]) -> str:
    """A file name that changes whenever the shard's files or the model do (so a stale shard is never reused)."""
    digest = hashlib.sha256(identity.encode())
    for image_id, path in items:
        digest.update(f"\0{image_id}\0{path}".encode())
    return digest.hexdigest()[:32] + ".npz"


def plan_shards(items: Sequence[tuple[int, str]], shard_size: int, identity: str) -> list[Shard]:
    """Group by id range, not by position: after a crash the still-pending images fall in the same shards."""
    groups: dict[int, list[tuple[int, str]]] = {}
    for image_id, path in items:
        groups.setdefault(image_id // shard_size, []).append((int(image_id), path))
    return [Shard(key, group, shard_name(identity, group)) for key, group in sorted(groups.items())]


def save_shard(shard: Shard, directory: Path, raw_dims: int) -> Path:
    """Write atomically (temp file + rename): a shard file on disk is always whole."""
    from ..vectors.catalog import as_stored

    path = directory / shard.name
    features = as_stored(shard.features, raw_dims)
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh, ids=np.asarray(shard.ids, np.int64), shas=np.asarray(shard.shas, dtype=str), features=features,
            signatures=np.asarray(shard.signatures, np.uint8).reshape(len(shard.ids), signature.WIDTH),
            failed_ids=np.asarray([i for i, _ in shard.failed], np.int64),
            reasons=np.asarray([r for _, r in shard.failed], dtype=str),
        )  # fmt: skip
    return path


def load_shard(shard: Shard, path: Path) -> Shard:
    with np.load(path, allow_pickle=False) as data:
        shard.ids = [int(i) for i in data["ids"]]
        shard.shas = [str(s) for s in data["shas"]]
        shard.features = list(from_stored(data["features"]))
        shard.signatures = list(data["signatures"]) if "signatures" in data else []  # shards written before them: none
        shard.failed = [(int(i), str(r)) for i, r in zip(data["failed_ids"], data["reasons"], strict=True)]
    return shard


def merge_shard(sink: Sink, shard: Shard) -> int:
    """One transaction, as the local path commits a batch; returns how many features were new."""
    have = sink.known(shard.shas)
    features: dict[str, np.ndarray] = {}
    for sha, vec in zip(shard.shas, shard.features, strict=True):
        if sha not in have:
            features.setdefault(sha, vec)
    signatures = {sha: sig for sha, sig in zip(shard.shas, shard.signatures) if sha in features}  # noqa: B905 (old shards: none)
    sink.commit(list(zip(shard.ids, shard.shas, strict=True)), features, shard.failed, signatures)
    return len(features)


# --- the Ray stages (run on the cluster's nodes) -------------------------------------------------


def decode_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """CPU task: read, hash and decode files; failures keep their row with a reason (zero pixels)."""
    from .pipeline import _decode_job, decoder_process

    decoder_process()
    results = [_decode_job((int(i), str(p), size)) for i, p in zip(batch["id"], batch["path"], strict=True)]
    blank = np.zeros((size, size, 3), np.uint8)
    pixels = np.stack([r[2] if r[2] is not None else blank for r in results])
    return {
        "id": np.asarray([r[0] for r in results], np.int64),
        "sha": np.asarray([r[1] or "" for r in results], dtype=object),
        "error": np.asarray([r[3] or "" for r in results], dtype=object),
        "pixels": pixels,
        "signature": signature.of_pixels(pixels),
        "decode_s": np.asarray([r[4] for r in results], np.float64),
        "decode_node": np.full(len(results), node_name(), dtype=object),
    }


def node_name() -> str:
    """This worker's node: its IP and the start of its node id (nodes of one machine share the IP)."""
    import ray

    return f"{ray.util.get_node_ip_address()} {ray.get_runtime_context().get_node_id()[:8]}"


class ModelActor:
    """Loads the collection's model once per actor; features for the decoded rows of each batch."""

    def __init__(self, settings: dict[str, Any]):
        from ..model import runtime

        self.extractor, digest = runtime.load_extractor(
            settings["model"], settings["pooling"], settings["weights"], device=settings["device"],
            precision=settings["precision"], threads=settings["threads"], runtime=settings["runtime"],
        )  # fmt: skip
        if digest != settings["weights_sha256"]:
            raise RisError(f"the weights on this node differ from the collection's (sha256 {digest[:12]}…)")
        self.dim = int(settings["raw_dims"])
        self.node = node_name()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray([e == "" for e in batch["error"]], bool)
        features = np.zeros((len(ok), self.dim), np.float32)
        start = time.perf_counter()
        if ok.any():
            features[ok] = self.extractor(np.ascontiguousarray(batch["pixels"][ok]))
        seconds = time.perf_counter() - start
        return {"id": batch["id"], "sha": batch["sha"], "error": batch["error"], "features": features,
                "signature": batch["signature"],
                "decode_s": batch["decode_s"], "model_s": np.full(len(ok), seconds / max(1, len(ok))),
                "decode_node": batch["decode_node"], "model_node": np.full(len(ok), self.node, dtype=object)}  # fmt: skip


# --- the driver ---------------------------------------------------------------------------------


def is_client(address: str | None) -> bool:
    return bool(address) and str(address).startswith(CLIENT)


def check_address(address: str | None) -> None:
    """The forms ris can use; a dashboard (Ray Jobs) URL is a common mix-up, told apart before connecting."""
    if address and "://" in address and not is_client(address):
        raise RisError(
            f"--ray {address}: not a Ray address; give ray://HEAD:10001 (Ray Client, from any machine), "
            "HEAD:6379 or auto (on a cluster node), or local"
        )


def connect(address: str | None) -> bool:
    """Join the cluster at `address` ('local' or None: a local instance). True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address in (None, "", LOCAL):
        # local workers inherit the model cache, so the export/calibration done on the driver is reused
        env = {k: v for k, v in os.environ.items() if k.startswith("RIS_")}
        ray.init(include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False, logging_level=logging.WARNING)
        return True
    heard = _Heard()  # Ray Client retries a refused token silently (debug log) until it times out
    client_log = logging.getLogger("ray.util.client.worker")
    client_log.addHandler(heard)
    level, client_log.level = client_log.level, logging.DEBUG
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Ray Client's timeout warning: the error below says it in one line
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        raise RisError(_connect_error(address, exc, heard.text)) from exc
    finally:
        client_log.removeHandler(heard)
        client_log.level = level
    return True


class _Heard(logging.Handler):
    """Keeps the messages a logger emits, to tell a refused token from an unreachable server."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text += record.getMessage() + "\n"


def _use_token_if_given() -> None:
    """Ray 2.60 clusters require a token by default (RAY_AUTH_MODE=token). A driver on a node turns token mode
    on by itself when it finds a token; Ray Client does not, so do it here for every cluster address, before
    Ray is imported (it reads the mode once: a program that imported Ray already sets RAY_AUTH_MODE itself)."""
    if "RAY_AUTH_MODE" not in os.environ and (
        os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or TOKEN_FILE.exists()
    ):
        os.environ["RAY_AUTH_MODE"] = "token"


def _connect_error(address: str, exc: BaseException, log: str) -> str:
    text = f"{exc}\n{log}".lower()
    if "unauthenticated" in text or "token" in text:
        return (
            f"the Ray cluster at {address} refused this process's token: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or "
            "~/.ray/auth_token) to the head's token (`ray get-auth-token` on the head), with RAY_AUTH_MODE=token"
        )
    if is_client(address):
        hint = "; is the head's --ray-client-server-port reachable from here, and RAY_AUTH_TOKEN the head's token?"
    else:
        hint = "; from a machine outside the cluster use ray://HEAD:10001 (Ray Client)"
    return f"cannot join the Ray cluster at {address}: {_first_line(exc)}{hint}"


def actor_settings(m: ModelSettings, gpus: float, threads: int) -> dict[str, Any]:
    device = "cuda" if gpus else "cpu"
    return {
        "model": m.model, "pooling": m.pooling, "weights": m.weights,
        "device": device, "precision": m.precision if device == "cpu" else None, "threads": threads,
        "runtime": m.cpu_runtime if device == "cpu" else None,
        "weights_sha256": m.weights_sha256, "raw_dims": m.raw_dims,
    }  # fmt: skip


def _identity(m: ModelSettings) -> str:
    return json.dumps([m.model, m.pooling, m.precision, m.weights_sha256, m.input_size, m.raw_dims])


def _build_dataset(shards: Sequence[Shard], settings: ModelSettings, batch_size: int, actors: int | None, threads: int | None):
    """files → decode tasks (CPU, spread over the nodes: Ray Data's default) → model actors (one GPU each when the
    cluster has GPUs)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = ctx.print_on_execution_start = False  # the caller shows its own progress
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus:
        size, gpu = actors or gpus, 1
    elif cpus < 2:  # the model actor would hold the only CPU and no decode task could ever run
        raise RisError(f"the Ray cluster has {cpus} CPU and no GPU: extraction needs at least 2 CPUs (model + decoding)")
    else:
        # one CPU reserved per actor, two model threads each: the split measured best locally (ORT 2 threads + decode)
        size, gpu = actors or max(1, cpus // 2), 0
    rows = [{"id": i, "path": p} for shard in shards for i, p in shard.items]
    # A decode task reserves its worker's memory: ≈ 130 MiB of process (Ray's issue detector saw up to 137 MiB at
    # batch 32) and its batch's pixels in and out. Its resources then differ from the model actors', which keeps
    # Ray from fusing decoding into them (it would run serially with the model there).
    memory = DECODE_PROCESS_BYTES + 2 * batch_size * settings.input_size**2 * 3
    return (
        ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 4 * cpus)))
        .map_batches(decode_batch, fn_kwargs={"size": settings.input_size}, batch_size=batch_size,
                     batch_format="numpy", num_cpus=1, memory=memory)
        .map_batches(ModelActor, fn_constructor_kwargs={"settings": actor_settings(settings, gpus, threads or 2)},
                     compute=ray.data.ActorPoolStrategy(size=size), batch_size=batch_size, batch_format="numpy",
                     num_cpus=1, num_gpus=gpu)
    )  # fmt: skip


def ray_extract(
    items: Sequence[tuple[int, str]],
    settings: ModelSettings,
    sink: Sink,
    directory: Path,
    address: str | None = LOCAL,
    batch_size: int = 32,
    shard_size: int = 1024,
    actors: int | None = None,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> StageTimes:
    """Extract features for pending `items` (id, path) on Ray and deliver them to `sink`, shard by shard.

    directory: where shards wait to be merged (resumable state; the collection's ray-shards/, local to this
    process: with ray://, shards come back over Ray Client). The caller holds the writer lock and brings the
    derived vectors up to date afterwards, as `Collection.index` does.
    actors: model actors (default: one per GPU, else one per two CPUs); threads: model threads per CPU actor.
    Returns the stage times, with `nodes`: images decoded and run through the model per cluster node.
    """
    if shard_size < 1 or batch_size < 1:
        raise RisError("batch and shard sizes must be at least 1")
    check_address(address)
    if address not in (None, "", LOCAL):
        _use_token_if_given()
    try:
        import ray
    except ImportError:
        raise RisError("--ray needs Ray: pip install 'ray[data]'") from None
    times = StageTimes(images=len(items))
    wall = time.perf_counter()
    directory.mkdir(exist_ok=True)
    shards = plan_shards(items, shard_size, _identity(settings))
    _drop_stale(directory, {s.name for s in shards})

    def finish(shard: Shard) -> None:
        start = time.perf_counter()
        path = save_shard(shard, directory, settings.raw_dims) if not (directory / shard.name).exists() else None
        times.extracted += merge_shard(sink, shard)
        (path or directory / shard.name).unlink(missing_ok=True)  # merged: the catalogue holds it now
        times.write += time.perf_counter() - start
        times.skipped += len(shard.failed)
        if progress:
            progress(len(shard.items))

    todo = []
    for shard in shards:
        if (directory / shard.name).exists():
            finish(load_shard(shard, directory / shard.name))  # written before a crash: merge, do not recompute
        else:
            todo.append(shard)
    if todo:
        if address in (None, "", LOCAL):
            _check_weights(settings)  # and exports/calibrates once, before the actors
        started = connect(address)
        try:
            if is_client(address):
                _from_driver_actor(todo, settings, batch_size, actors, threads, times, finish)
            else:
                for shard in completed_shards(_build_dataset(todo, settings, batch_size, actors, threads), todo, times):
                    finish(shard)
        except ray.exceptions.RayError as exc:
            raise RisError(f"Ray extraction failed: {_first_line(exc)}") from exc
        finally:
            if started:
                ray.shutdown()
    times.wall = time.perf_counter() - wall
    return times


def _check_weights(m: ModelSettings) -> None:
    """Load the model here once: a weights mismatch fails before any actor starts, and the export is cached."""
    from ..model import runtime

    _, digest = runtime.load_extractor(m.model, m.pooling, m.weights, device="cpu", precision=m.precision, threads=1,
                                       runtime=m.cpu_runtime)  # fmt: skip
    if digest != m.weights_sha256:
        raise RisError(f"these {m.model} weights differ from the collection's (sha256 {digest[:12]}…); pass the same --weights")


def completed_shards(dataset, todo: Sequence[Shard], times: StageTimes) -> Iterator[Shard]:
    """Gather result rows into their shards; yield each shard as soon as it is whole. Adds the cluster's
    decode/model seconds and per-node counts to `times`."""
    by_id = {image_id: shard for shard in todo for image_id, _ in shard.items}
    waited = time.perf_counter()
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        times.wait += time.perf_counter() - waited
        times.decode += float(batch["decode_s"].sum())
        times.model += float(batch["model_s"].sum())
        ok = np.asarray([e == "" for e in batch["error"]], bool)
        _count(times.nodes, batch["decode_node"], "decoded")
        _count(times.nodes, batch["model_node"][ok], "extracted")
        rows = zip(batch["id"], batch["sha"], batch["error"], batch["features"], batch["signature"], strict=True)
        for image_id, sha, error, vec, sig in rows:
            shard = by_id[int(image_id)]
            if error:
                shard.failed.append((int(image_id), str(error)))
            else:
                shard.ids.append(int(image_id))
                shard.shas.append(str(sha))
                shard.features.append(vec)
                shard.signatures.append(sig)
            if shard.complete:
                yield shard
        waited = time.perf_counter()


def _count(nodes: dict[str, dict[str, int]], names: np.ndarray, what: str) -> None:
    for name, n in zip(*np.unique(names.astype(str), return_counts=True), strict=True):
        counts = nodes.setdefault(str(name), {"decoded": 0, "extracted": 0})
        counts[what] += int(n)


class DriverActor:
    """The pipeline's driver on a cluster node, for a caller connected through Ray Client (where Ray Data's
    streaming executor cannot run). It holds no CPU; each `next` call returns the next whole shard."""

    def __init__(self, todo: list[Shard], settings: ModelSettings, batch_size: int, actors: int | None, threads: int | None):
        self.raw_dims = settings.raw_dims
        self.times = StageTimes()
        self.shards = completed_shards(_build_dataset(todo, settings, batch_size, actors, threads), todo, self.times)

    def next(self) -> tuple[Shard | None, StageTimes]:
        """The next shard (features as stored: bfloat16 bits, half the bytes over the wire) and the times so far."""
        from ..vectors.catalog import as_stored

        shard = next(self.shards, None)
        if shard is not None:
            shard.features = list(as_stored(shard.features, self.raw_dims))
        return shard, self.times


def _from_driver_actor(todo: list[Shard], settings: ModelSettings, batch_size: int, actors: int | None,
                       threads: int | None, times: StageTimes, finish: Callable[[Shard], None]) -> None:  # fmt: skip
    import ray

    driver = ray.remote(num_cpus=0)(DriverActor).remote(todo, settings, batch_size, actors, threads)
    try:
        while True:
            waited = time.perf_counter()
            shard, remote = ray.get(driver.next.remote())
            times.wait += time.perf_counter() - waited
            times.decode, times.model, times.nodes = remote.decode, remote.model, remote.nodes
            if shard is None:
                return
            if shard.features:  # back from the wire's bfloat16 bits
                shard.features = list(from_stored(np.asarray(shard.features)))
            finish(shard)
    finally:
        ray.kill(driver)


def _drop_stale(directory: Path, wanted: set[str]) -> None:
    """Shard files of other file lists were merged already (or belong to a model no longer used)."""
    for path in directory.iterdir():
        if path.name not in wanted:
            path.unlink(missing_ok=True)


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, (RisError, DecodeError)):
        return str(cause)
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
