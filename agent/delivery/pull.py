"""The chunk inbox and the pull of one model into the store.

`ChunkInbox` sits between paho's thread and the updater's worker: only chunks of the
model being downloaded are kept, within a byte budget; anything else (a late reply, or
replies someone else asked for) is dropped on arrival and counted. `pull()` runs the
windowed `Fetcher` over a `Download` and moves the verified file into the store.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from agent.delivery.fetch import Chunk, ChunkSource, Fetcher, FetchError, FetchStats, Retryable
from agent.delivery.store import Download

log = logging.getLogger(__name__)

INBOX_BYTES = 64 * 1024 * 1024  # chunks waiting for the worker, at most
IN_FLIGHT_BYTES = 16 * 1024 * 1024  # chunks requested and not yet arrived, about
REQUEST_BATCH = 8  # chunks asked for in one block request


class ChunkInbox:
    def __init__(self) -> None:
        self.queue: queue.Queue[Chunk] = queue.Queue(maxsize=64)
        self._sha = ""  # chunks of any other model are dropped on arrival
        self.unsolicited = 0

    def on_chunk(self, chunk: Chunk) -> None:
        """paho's thread: keep it if it belongs to the current download and there is room."""
        if chunk.sha256 != self._sha:
            self.unsolicited += 1
            return
        try:
            self.queue.put_nowait(chunk)
        except queue.Full:  # the worker is behind: the chunk is asked for again after its timeout
            log.debug("chunk inbox full; dropping chunk %d", chunk.index)

    def open(self, sha256: str, chunk_size: int) -> queue.Queue[Chunk]:
        """Accept chunks of `sha256` from now on, into a fresh queue bounded by INBOX_BYTES."""
        self.queue = queue.Queue(maxsize=max(8, INBOX_BYTES // chunk_size))
        self._sha = sha256
        return self.queue

    def close(self) -> None:
        self._sha = ""


def request_window(chunk_size: int) -> int:
    """Chunks kept requested: about 16 MiB (16..64 chunks), enough to cover the round trip
    through the broker and the server at loopback speed."""
    return max(16, min(64, IN_FLIGHT_BYTES // chunk_size))


def pull(download: Download, source: ChunkSource, inbox: ChunkInbox, cancel: threading.Event, *,
         progress: Callable[[int, int, FetchStats], None], options: dict[str, Any] | None = None) -> FetchStats:
    """Fetch every chunk `download` lacks, verify the whole file and move it into the store.

    Raises Retryable when nothing arrived (what is durable stays for the next try),
    FetchError/StoreError when the model cannot be had, Cancelled when `cancel` is set.
    """
    m = download.manifest
    chunks = inbox.open(m.sha256, m.chunk_size)
    opts = {"window": request_window(m.chunk_size), "batch": REQUEST_BATCH, **(options or {})}
    fetcher = Fetcher(download, source, chunks, progress=progress, **opts)
    try:
        fetcher.run(cancel)
        download.finish()
    except FetchError as exc:
        download.close()
        if exc.retryable:
            raise Retryable(str(exc)) from exc
        raise
    except BaseException:
        download.close()
        raise
    finally:
        inbox.close()
    return fetcher.stats
