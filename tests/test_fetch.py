"""The chunk fetch loop against a model server stand-in at our own seam (ChunkSource)."""

from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path

import pytest

from agent.delivery.fetch import Cancelled, Chunk, Fetcher, FetchError
from agent.delivery.store import ModelStore
from agent.wire.manifest import build_manifest
from engines.modelcard import parse_card
from onnx_models import color_card_json

CHUNK = 4096


class Server:
    """Answers requests from `data`, optionally losing, corrupting or going offline."""

    def __init__(self, data: bytes, sha: str, inbox: queue.Queue[Chunk]) -> None:
        self.data, self.sha, self.inbox = data, sha, inbox
        self.connected = True
        self.requests: list[int] = []
        self.lose_first: set[int] = set()
        self.corrupt: dict[int, int] = {}  # index -> how many bad copies to send first

    def request(self, sha256: str, indices: list[int], request_id: str) -> None:
        for i in indices:
            self.requests.append(i)
            if i in self.lose_first:
                self.lose_first.discard(i)
                continue
            if self.corrupt.get(i, 0) > 0:
                self.corrupt[i] -= 1
                self.inbox.put(Chunk(sha256, i, os.urandom(CHUNK), request_id))
                continue
            self.inbox.put(Chunk(sha256, i, self.data[i * CHUNK:(i + 1) * CHUNK], request_id))


def setup(tmp_path: Path, n: int = 40):
    data = os.urandom(n * CHUNK - 100)
    m = build_manifest(data, parse_card(json.loads(color_card_json())), chunk_size=CHUNK)
    store = ModelStore(tmp_path)
    inbox: queue.Queue[Chunk] = queue.Queue()
    return data, m, store, inbox, Server(data, m.sha256, inbox)


def test_fetch_all_in_window_then_finish(tmp_path: Path) -> None:
    data, m, store, inbox, server = setup(tmp_path)
    seen = []
    f = Fetcher(store.begin(m, b"{}"), server, inbox, window=8, batch=3,
                progress=lambda done, total, st: seen.append((done, total)))
    f.run(threading.Event())
    assert sorted(server.requests) == list(range(m.n_chunks))  # each chunk asked for once
    assert f.d.finish().read_bytes() == data
    assert seen[-1] == (m.n_chunks, m.n_chunks) and f.stats.received == m.n_chunks


def test_lost_replies_are_re_requested_after_the_timeout(tmp_path: Path) -> None:
    data, m, store, inbox, server = setup(tmp_path)
    server.lose_first = {3, 17}
    f = Fetcher(store.begin(m, b"{}"), server, inbox, timeout_s=0.2)
    f.run(threading.Event())
    assert server.requests.count(3) == 2 and server.requests.count(17) == 2
    assert f.stats.re_requested == 2 and f.d.finish().read_bytes() == data


def test_forged_chunks_are_discarded_and_refetched(tmp_path: Path) -> None:
    data, m, store, inbox, server = setup(tmp_path)
    server.corrupt = {5: 2}
    f = Fetcher(store.begin(m, b"{}"), server, inbox, max_rejects=3)
    f.run(threading.Event())
    assert f.stats.rejected == 2 and "chunk 5" in f.last_reject
    assert f.d.finish().read_bytes() == data


def test_a_chunk_that_keeps_failing_fails_the_download(tmp_path: Path) -> None:
    _, m, store, inbox, server = setup(tmp_path)
    server.corrupt = {5: 99}
    f = Fetcher(store.begin(m, b"{}"), server, inbox, max_rejects=3)
    with pytest.raises(FetchError, match="chunk 5 failed verification 3 times"):
        f.run(threading.Event())


def test_stall_and_cancel(tmp_path: Path) -> None:
    _, m, store, inbox, server = setup(tmp_path)
    server.lose_first = set(range(m.n_chunks))
    f = Fetcher(store.begin(m, b"{}"), server, inbox, timeout_s=10, stall_s=0.3)
    with pytest.raises(FetchError, match="no chunk"):
        f.run(threading.Event())
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        Fetcher(store.begin(m, b"{}"), server, inbox).run(cancel)


def test_offline_pauses_without_stalling_and_resumes(tmp_path: Path) -> None:
    data, m, store, inbox, server = setup(tmp_path)
    server.connected = False
    f = Fetcher(store.begin(m, b"{}"), server, inbox, stall_s=0.2)
    t = threading.Thread(target=f.run, args=(threading.Event(),))
    t.start()
    t.join(0.6)
    assert t.is_alive() and server.requests == []  # waiting, not failing
    server.connected = True
    t.join(5)
    assert not t.is_alive() and f.d.finish().read_bytes() == data
