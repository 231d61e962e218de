"""Windowed, resumable pull of a model's chunks into a `Download`.

Transport-agnostic: a `ChunkSource` sends block requests (over MQTT, to
`jetfleet serve`); replies arrive as `Chunk`s in a queue filled by the link's
callback. Only this worker thread touches the download.

Durability: progress is made durable (data fsync, then the bitmap) at most
every `flush_s`; a crash loses at most that much verified progress, and what
the durable bitmap holds is never requested again.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agent.delivery.store import ChunkRejected, Download
from engines.errors import JetagentError

log = logging.getLogger(__name__)


class FetchError(JetagentError):
    """The download cannot complete: a chunk failed verification repeatedly, or nothing arrives.

    `retryable`: nothing arrived (no model server yet?): the same job may run again later,
    from what is durable."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class Cancelled(JetagentError):
    """A newer job replaced this one."""


class Retryable(JetagentError):
    """A failure of the surroundings (no manifest yet, no model server): reported, but the
    job is not marked done, so the same desired state runs again after a restart."""


@dataclass(frozen=True)
class Chunk:
    sha256: str
    index: int
    data: bytes | memoryview
    request_id: str = ""  # the correlation data of the request it answers


class ChunkSource(Protocol):
    @property
    def connected(self) -> bool: ...

    def request(self, sha256: str, indices: list[int], request_id: str) -> None:
        """Ask the model server(s) for these chunks. May raise if the link is down."""


@dataclass
class FetchStats:
    requested: int = 0
    received: int = 0
    duplicates: int = 0
    rejected: int = 0
    re_requested: int = 0
    bytes: int = 0
    seconds: float = 0.0


class Fetcher:
    def __init__(self, download: Download, source: ChunkSource, inbox: queue.Queue[Chunk], *,
                 window: int = 16, batch: int = 4, timeout_s: float = 5.0, stall_s: float = 60.0,
                 max_rejects: int = 3, flush_s: float = 0.5,
                 progress: Callable[[int, int, FetchStats], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.d = download
        self.source = source
        self.inbox = inbox
        self.window, self.batch = max(1, window), max(1, batch)
        self.timeout_s, self.stall_s, self.flush_s = timeout_s, stall_s, flush_s
        self.max_rejects = max_rejects
        self.progress = progress
        self.clock = clock
        self.stats = FetchStats()
        self._rejects: collections.Counter[int] = collections.Counter()
        self.last_reject = ""
        # Request ids we sent (bounded): a frame answering none of them is unsolicited and
        # ignored, so forged frames from someone who never saw our requests cost nothing.
        self._sent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.unsolicited = 0

    def run(self, cancel: threading.Event) -> None:
        sha = self.d.manifest.sha256
        todo = collections.deque(self.d.missing())
        outstanding: dict[int, float] = {}
        start = last_flush = last_progress = last_chunk = self.clock()
        was_connected = self.source.connected
        while not self.d.complete:
            if cancel.is_set():
                self.d.flush()
                raise Cancelled("a newer deployment replaced this one")
            now = self.clock()
            connected = self.source.connected
            if not connected:
                # Requests in flight died with the connection: ask again once it is back.
                todo.extendleft(sorted(outstanding, reverse=True))
                outstanding.clear()
                last_chunk = now  # a broker outage is not a stall
            elif not was_connected:
                last_chunk = now
            was_connected = connected
            if connected:
                self._top_up(sha, todo, outstanding, now)
            try:
                item: Chunk | None = self.inbox.get(timeout=0.05)
            except queue.Empty:
                item = None
            while item is not None:  # drain everything that has arrived: one flush covers it all
                if item.sha256 == sha:
                    last_chunk = self.clock()
                    self._accept(item, todo, outstanding)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = None
            now = self.clock()
            for idx, sent in list(outstanding.items()):
                if now - sent > self.timeout_s:
                    del outstanding[idx]
                    todo.appendleft(idx)
                    self.stats.re_requested += 1
            if now - last_flush >= self.flush_s:
                self.d.flush()
                last_flush = now
            if self.progress is not None and now - last_progress >= 0.5:
                self.progress(self.d.done, self.d.manifest.n_chunks, self.stats)
                last_progress = now
            if connected and now - last_chunk > self.stall_s:
                self.d.flush()
                raise FetchError(f"no chunk of {sha[:12]} arrived for {self.stall_s:.0f} s while connected; "
                                 "is a model server (jetfleet serve) running with this model?"
                                 + (f" (last server error: {err})" if (err := getattr(self.source, "last_error", ""))
                                    else ""), retryable=True)
        self.d.flush()
        self.stats.seconds = self.clock() - start
        if self.progress is not None:
            self.progress(self.d.done, self.d.manifest.n_chunks, self.stats)

    def _top_up(self, sha: str, todo: collections.deque[int], outstanding: dict[int, float], now: float) -> None:
        while todo and len(outstanding) < self.window:
            n = min(self.batch, self.window - len(outstanding))
            indices: list[int] = []
            while todo and len(indices) < n:
                i = todo.popleft()
                if not self.d.bitmap[i] and i not in outstanding:
                    indices.append(i)
            if not indices:
                continue
            rid = uuid.uuid4().hex[:16]
            self._sent[rid] = None
            while len(self._sent) > 4096:
                self._sent.popitem(last=False)
            try:
                self.source.request(sha, indices, rid)
            except JetagentError as exc:  # the link went down between the check and the send
                log.info("chunk request not sent (%s); will retry", exc)
                todo.extendleft(reversed(indices))
                return
            for i in indices:
                outstanding[i] = now
            self.stats.requested += len(indices)

    def _accept(self, item: Chunk, todo: collections.deque[int], outstanding: dict[int, float]) -> None:
        if item.request_id not in self._sent or not 0 <= item.index < self.d.manifest.n_chunks:
            self.unsolicited += 1
            return
        try:
            fresh = self.d.write_chunk(item.index, item.data)
        except ChunkRejected as exc:
            # Forged or corrupt bytes (anyone who can publish to our reply topic could
            # send them): discard, count, ask again, and give up on a chunk that keeps failing.
            self.stats.rejected += 1
            self._rejects[item.index] += 1
            self.last_reject = str(exc)
            log.warning("model %s: %s", item.sha256[:12], exc)
            if self._rejects[item.index] >= self.max_rejects:
                raise FetchError(f"chunk {item.index} failed verification {self._rejects[item.index]} times; "
                                 f"last: {exc}") from None
            if 0 <= item.index < self.d.manifest.n_chunks:
                outstanding.pop(item.index, None)
                if item.index not in todo:
                    todo.appendleft(item.index)
            return
        outstanding.pop(item.index, None)
        if fresh:
            self.stats.received += 1
            self.stats.bytes += len(item.data)
        else:
            self.stats.duplicates += 1
