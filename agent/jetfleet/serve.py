"""`jetfleet serve`: the model server. Devices pull chunks; this answers.

Subscribes `$share/<group>/{p}/models/+/get`, so several servers split the requests
between them (the broker gives each request to one member of the share group). Each
block request is answered on its Response Topic with one chunk frame per index asked
for (agent.wire.chunks.chunk_frame), QoS 1, never retained, carrying the
request's Correlation Data.

Threads: paho's network thread only queues requests (`_on_request`); one worker reads
chunks with os.pread from files kept open and hands frames to paho without waiting for
each PUBACK (`FleetClient.publish_nowait`: at most `window` unacknowledged, so a slow
broker slows the worker, never fills memory). One worker is enough: the sending is
done by paho's network thread, and a single reader owns the open-file cache.

Refused without an answer: a request with no Response Topic, or one whose Response
Topic is not under `{p}/dev/<its device_id>/reply/` (a requester must not be able to
point the server's output at someone else's topic). Answered with a JSON server_error:
an unknown model, a malformed request, a chunk that cannot be read.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from agent.jetfleet.client import FleetClient, FleetError, TooLarge
from agent.jetfleet.repo import ModelRepo
from agent.wire.chunks import chunk_frame, parse_get_request, server_error
from agent.wire.core import Inbound, ProtocolError, Topics, encode, valid_id
from agent.wire.manifest import Manifest
from engines.errors import JetagentError

log = logging.getLogger(__name__)

UNKNOWN_RETRY_S = 1.0  # how long an unknown sha is remembered before the repo is looked at again


@dataclass(frozen=True)
class Request:
    topic: str
    payload: bytes
    response_topic: str | None
    correlation: bytes | None
    received: float


@dataclass
class ServeStats:
    requests: int = 0
    chunks: int = 0
    bytes: int = 0  # chunk payload bytes (frame headers not counted)
    errors: int = 0  # answered with a server_error
    refused: int = 0  # not answered: no or foreign response topic
    dropped: int = 0  # the request queue was full; the device asks again after its timeout
    devices: set[str] = field(default_factory=set)

    def snapshot(self) -> dict[str, Any]:
        return {"requests": self.requests, "chunks": self.chunks, "bytes": self.bytes, "errors": self.errors,
                "refused": self.refused, "dropped": self.dropped, "devices": len(self.devices)}


class _OpenModel:
    def __init__(self, manifest: Manifest, fd: int, stamp: tuple[int, int]) -> None:
        self.manifest, self.fd, self.stamp = manifest, fd, stamp


def _stamp(path: os.PathLike[str] | str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


class _Throttle:
    """At most one log line per `every` seconds per key; says how many were held back."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self._last: dict[str, tuple[float, int]] = {}

    def log(self, key: str, level: int, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last, held = self._last.get(key, (0.0, 0))
        if now - last < self.every:
            self._last[key] = (last, held + 1)
            return
        self._last[key] = (now, 0)
        suffix = f" (and {held} more like it)" if held else ""
        log.log(level, msg + suffix, *args)


class ModelServer:
    """Answers block requests from a ModelRepo over a connected FleetClient."""

    def __init__(self, client: FleetClient, repo: ModelRepo, *, share_group: str | None = "jetfleet",
                 queue_size: int = 1024, max_open: int = 32) -> None:
        self.client, self.repo, self.share_group = client, repo, share_group
        self.topics: Topics = client.topics
        self.stats = ServeStats()
        self._requests: queue.Queue[Request] = queue.Queue(maxsize=queue_size)
        self._open: OrderedDict[str, _OpenModel] = OrderedDict()
        self._unknown: dict[str, float] = {}
        self.max_open = max_open
        self.unknown_retry_s = UNKNOWN_RETRY_S
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._throttle = _Throttle()

    @property
    def subscription(self) -> str:
        return self.topics.all_gets(self.share_group)

    def start(self) -> ModelServer:
        self._worker = threading.Thread(target=self._run, name="serve-worker", daemon=True)
        self._worker.start()
        self.client.subscribe(self.subscription, self._on_request, qos=1, require_grant=True)
        log.info("serving %d model(s) from %s on %s", len(self.repo.shas()), self.repo.root, self.subscription)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout)
        for m in self._open.values():
            os.close(m.fd)
        self._open.clear()

    # -- paho's thread: queue and return -----------------------------------------------------
    def _on_request(self, msg: Inbound) -> None:
        try:
            self._requests.put_nowait(Request(msg.topic, msg.payload, msg.response_topic, msg.correlation_data,
                                              time.monotonic()))
        except queue.Full:
            self.stats.dropped += 1

    # -- the worker --------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                req = self._requests.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.handle(req)
            except FleetError as exc:  # stopped, or the broker stopped acknowledging
                self._throttle.log("publish", logging.WARNING, "cannot answer a request on %s: %s",
                                   req.response_topic, exc)
            except OSError as exc:
                self._throttle.log("io", logging.ERROR, "reading the repository failed: %s", exc)

    def handle(self, req: Request) -> None:
        """Answer one block request (called on the worker thread; public for tests)."""
        self.stats.requests += 1
        parsed = self.topics.parse_model(req.topic)
        if parsed is None or parsed[1] != "get":
            return
        sha = parsed[0]
        if req.response_topic is None:
            self._refuse(req, "it has no response topic")
            return
        model = self._model(sha)
        if model is None:
            self._error(req, sha, _claimed_device(req.payload), f"model {sha[:12]} is not on this server")
            return
        try:
            device_id, indices = parse_get_request(req.payload, model.manifest.n_chunks)
        except ProtocolError as exc:
            self._error(req, sha, _claimed_device(req.payload), str(exc))
            return
        if not self._allowed(req.response_topic, device_id):
            self._refuse(req, f"its response topic is not under {self.topics.reply(device_id, '')}")
            return
        self.stats.devices.add(device_id)
        m = model.manifest
        for index in indices:
            start, end = m.chunk_range(index)
            # chunk_frame's header, then the bytes read straight into the same buffer (one copy fewer)
            header = chunk_frame(sha, index, b"")
            frame = bytearray(len(header) + end - start)
            frame[:len(header)] = header
            if os.preadv(model.fd, [memoryview(frame)[len(header):]], start) != end - start:
                self._error(req, sha, device_id, f"chunk {index} of {sha[:12]} cannot be read on the server")
                return
            try:
                self.client.publish_nowait(req.response_topic, frame, correlation_data=req.correlation,
                                           stop=self._stop)
            except TooLarge as exc:
                self._error(req, sha, device_id, f"chunk {index} does not fit the broker: {exc}")
                return
            self.stats.chunks += 1
            self.stats.bytes += end - start

    def _allowed(self, response_topic: str, device_id: str) -> bool:
        head = self.topics.reply(device_id, "")
        rest = response_topic[len(head):]
        return response_topic.startswith(head) and bool(rest) and not any(c in rest for c in "+#")

    def _refuse(self, req: Request, why: str) -> None:
        self.stats.refused += 1
        self._throttle.log("refused", logging.WARNING, "refused a request on %s: %s", req.topic, why)

    def _error(self, req: Request, sha: str, device_id: str | None, error: str) -> None:
        self.stats.errors += 1
        self._throttle.log("error", logging.WARNING, "request on %s from %s: %s", req.topic,
                           device_id or "an unknown device", error)
        if req.response_topic is None or device_id is None or not self._allowed(req.response_topic, device_id):
            self.stats.refused += 1  # nowhere safe to say so
            return
        self.client.publish_nowait(req.response_topic, encode(server_error(sha, error)),
                                   correlation_data=req.correlation, stop=self._stop)

    def _model(self, sha: str) -> _OpenModel | None:
        """The open model, from the cache or the repo (so a push made after start is served).

        A manifest re-written since it was read (the same model pushed again with another
        chunk size) is read again: a stat per request, cheap next to reading the chunks.
        """
        m = self._open.get(sha)
        if m is not None:
            try:
                fresh = _stamp(self.repo.manifests / f"{sha}.json") == m.stamp
            except OSError:
                fresh = False
            if fresh:
                self._open.move_to_end(sha)
                return m
            del self._open[sha]
            os.close(m.fd)
        now = time.monotonic()
        if sha in self._unknown and now - self._unknown[sha] < self.unknown_retry_s:
            return None
        try:
            stamp = _stamp(self.repo.manifests / f"{sha}.json")
            entry = self.repo.get(sha)
            fd = os.open(entry.model_path, os.O_RDONLY)
        except (JetagentError, OSError, ValueError) as exc:
            log.debug("model %s: %s", sha[:12], exc)
            if len(self._unknown) > 10000:
                self._unknown.clear()
            self._unknown[sha] = now
            return None
        if os.fstat(fd).st_size != entry.manifest.size:
            os.close(fd)
            log.error("repository file of %s is %d bytes, its manifest says %d; not serving it", sha[:12],
                      os.path.getsize(entry.model_path), entry.manifest.size)
            self._unknown[sha] = now
            return None
        self._unknown.pop(sha, None)
        m = self._open[sha] = _OpenModel(entry.manifest, fd, stamp)
        log.info("now serving %s (%s, %d bytes, %d chunks of %d)", sha[:12], entry.manifest.name,
                 entry.manifest.size, entry.manifest.n_chunks, entry.manifest.chunk_size)
        while len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            os.close(old.fd)
        return m


def _claimed_device(payload: bytes) -> str | None:
    """The device_id a (possibly malformed) request names, if it names a valid one."""
    try:
        msg = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    device = msg.get("device_id") if isinstance(msg, dict) else None
    return device if isinstance(device, str) and valid_id(device) else None


def throughput_line(prev: dict[str, Any], cur: dict[str, Any], seconds: float, in_flight: int) -> str:
    chunks, nbytes = cur["chunks"] - prev["chunks"], cur["bytes"] - prev["bytes"]
    return (f"served {chunks} chunks, {nbytes / 1e6:.1f} MB in {seconds:.1f} s = {nbytes / 1e6 / seconds:.1f} MB/s; "
            f"requests {cur['requests'] - prev['requests']}, errors {cur['errors'] - prev['errors']}, "
            f"refused {cur['refused'] - prev['refused']}, dropped {cur['dropped'] - prev['dropped']}, "
            f"devices {cur['devices']}, in flight {in_flight}")


def serve_forever(server: ModelServer, stop: threading.Event, log_interval: float = 10.0) -> dict[str, Any]:
    """Log a throughput line every `log_interval` s with traffic, until `stop` is set."""
    prev, t_prev = server.stats.snapshot(), time.monotonic()
    while not stop.wait(log_interval):
        cur, t = server.stats.snapshot(), time.monotonic()
        if cur != prev:
            log.info("%s", throughput_line(prev, cur, t - t_prev, server.client.in_flight))
        prev, t_prev = cur, t
    totals = server.stats.snapshot()
    log.info("stopped: %d requests, %d chunks (%.1f MB), %d errors, %d refused, %d dropped", totals["requests"],
             totals["chunks"], totals["bytes"] / 1e6, totals["errors"], totals["refused"], totals["dropped"])
    return totals
