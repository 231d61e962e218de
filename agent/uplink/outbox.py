"""The on-disk outbox: every report goes through it, so nothing made while offline is lost.

`Outbox` is a SQLite queue in the state directory (WAL, synchronous=FULL: a committed
`put` survives a power cut). It assigns each message its `seq`: per device,
contiguous, persisted across restarts. It is bounded by a message count and a byte
total; going over drops the oldest, and the number dropped is itself persisted and
reported.

`OutboxPublisher` is the one thread that drains it, in seq order, through a
`Transport` (the MQTT link; a fake in unit tests). A row is deleted only after its
PUBACK. At most `window` messages are unacknowledged at a time. paho keeps the
messages it was handed and resends them first after a reconnect; the publisher holds
new ones back until those are acknowledged, so the broker sees them in order.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from engines.errors import JetagentError

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL,
    qos INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class OutboxError(JetagentError):
    """The outbox could not store a message (disk full, I/O error)."""


@dataclass(frozen=True)
class Row:
    seq: int
    topic: str
    payload: bytes
    qos: int


class Outbox:
    """A bounded, durable FIFO of (topic, payload) with per-device sequence numbers. Thread-safe."""

    def __init__(self, path: Path, max_messages: int = 10000, max_bytes: int = 64 * 1024 * 1024) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("outbox bounds must be positive")
        self.path = path
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            # A damaged file must not stop the agent: keep it for a post-mortem, start empty.
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            log.error("outbox %s is unreadable (%s); moved aside to %s, starting empty", path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{path}{suffix}")
                if src.exists():
                    os.replace(src, f"{aside}{suffix}")
            self._db = self._open()
        self._next_seq = self._meta("next_seq", 1)
        self.dropped = self._meta("dropped", 0)
        self.rejected = self._meta("rejected", 0)
        self._count, self._bytes = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages").fetchone()
        self._trim_locked_commit()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            db.execute("SELECT COUNT(*) FROM messages").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _meta(self, key: str, default: int) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else default

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- producer side ------------------------------------------------------------------
    def put(self, topic: str, build: Callable[[int], bytes], qos: int = 1) -> int:
        """Store one message; `build(seq)` makes its payload. Returns the seq.

        Committed (fsynced) before it returns. Raises OutboxError if it cannot be stored;
        the seq is then not used.
        """
        with self._lock:
            seq = self._next_seq
            payload = build(seq)
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._set_meta("next_seq", seq + 1)
                if len(payload) > self.max_bytes:
                    # Could never fit: count it as dropped, keep the seq gap honest.
                    self.dropped += 1
                    self._set_meta("dropped", self.dropped)
                    log.warning("outbox: message %d (%d bytes) is over the %d-byte bound; dropped",
                                seq, len(payload), self.max_bytes)
                else:
                    self._db.execute("INSERT INTO messages (seq, topic, payload, qos, created) VALUES (?,?,?,?,?)",
                                     (seq, topic, payload, qos, time.time()))
                    self._count += 1
                    self._bytes += len(payload)
                    self._trim_locked()
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback_locked()
                raise OutboxError(f"outbox {self.path}: cannot store message: {exc}") from exc
            self._next_seq = seq + 1
            return seq

    def _trim_locked(self) -> None:
        """Drop the oldest rows until within both bounds (inside the caller's transaction)."""
        while self._count > self.max_messages or self._bytes > self.max_bytes:
            over = max(1, self._count - self.max_messages)
            rows = self._db.execute("SELECT seq, LENGTH(payload) FROM messages ORDER BY seq LIMIT ?",
                                    (over,)).fetchall()
            if not rows:
                self._count, self._bytes = 0, 0
                break
            if self._count <= self.max_messages:  # only bytes are over: drop one at a time
                rows = rows[:1]
            self._db.execute("DELETE FROM messages WHERE seq <= ?", (rows[-1][0],))
            self._count -= len(rows)
            self._bytes -= sum(n for _, n in rows)
            self.dropped += len(rows)
            self._set_meta("dropped", self.dropped)
            log.warning("outbox full (%d messages, %d bytes max): dropped %d oldest (%d dropped in all)",
                        self.max_messages, self.max_bytes, len(rows), self.dropped)

    def _trim_locked_commit(self) -> None:
        # The bounds may have shrunk in the config since the last run.
        if self._count > self.max_messages or self._bytes > self.max_bytes:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                self._trim_locked()
                self._db.execute("COMMIT")

    def _rollback_locked(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # no transaction was open
        self._count, self._bytes = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages").fetchone()
        self.dropped = self._meta("dropped", 0)

    # -- consumer side ------------------------------------------------------------------
    def peek(self, after_seq: int = 0, limit: int = 16) -> list[Row]:
        """The oldest rows with seq > after_seq, in order."""
        with self._lock:
            rows = self._db.execute("SELECT seq, topic, payload, qos FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (after_seq, limit)).fetchall()
        return [Row(int(s), str(t), bytes(p), int(q)) for s, t, p, q in rows]

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete delivered rows (missing ones, already dropped, are ignored). Returns rows deleted."""
        wanted = sorted(set(seqs))
        if not wanted:
            return 0
        marks = ",".join("?" * len(wanted))
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                n, size = self._db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages WHERE seq IN ({marks})",
                    wanted).fetchone()
                self._db.execute(f"DELETE FROM messages WHERE seq IN ({marks})", wanted)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback_locked()
                log.error("outbox: cannot delete delivered messages (they will be sent again): %s", exc)
                return 0
            self._count -= n
            self._bytes -= size
            return int(n)

    def reject(self, seq: int, reason: str) -> None:
        """Remove a row that can never be delivered (too large for the broker, refused by it)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute("SELECT LENGTH(payload) FROM messages WHERE seq = ?", (seq,)).fetchone()
                self._db.execute("DELETE FROM messages WHERE seq = ?", (seq,))
                self.rejected += 1
                self._set_meta("rejected", self.rejected)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback_locked()
                log.error("outbox: cannot remove undeliverable message %d: %s", seq, exc)
                return
            if row is not None:
                self._count -= 1
                self._bytes -= int(row[0])
        log.error("outbox: message %d cannot be delivered and was removed: %s", seq, reason)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"queued": int(self._count), "bytes": int(self._bytes), "dropped": self.dropped,
                    "rejected": self.rejected, "next_seq": self._next_seq}

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Transport(Protocol):
    """What the publisher needs from the MQTT link."""

    @property
    def connected(self) -> bool: ...

    @property
    def connection_id(self) -> int: ...  # +1 on every successful connect

    @property
    def send_window(self) -> int: ...  # unacknowledged QoS 1 messages the broker allows us

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, *,
                on_ack: Callable[[int], None] | None = None) -> None: ...


class Undeliverable(JetagentError):
    """Raised by a Transport for a message the broker can never take (e.g. over its packet size)."""


class OutboxPublisher:
    """Drains the outbox through a transport, in order, deleting rows on PUBACK."""

    HOLD_TIMEOUT_S = 60.0  # after a reconnect, how long to wait for paho's own resends

    def __init__(self, outbox: Outbox, transport: Transport, window: int = 16) -> None:
        self.outbox = outbox
        self.transport = transport
        self.window = max(1, window)
        self._acks: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self._inflight: dict[int, int] = {}  # seq -> connection id it was sent on
        self._last_sent = 0
        self._held_since: float | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.acked = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-publisher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Something changed (a new message, a connect): look now rather than at the next tick."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(5.0)  # acks, new reports and connects wake it; this is a safety tick
            self._wake.clear()
            try:
                self.step()
            except Exception:  # a bug: keep the traceback, keep the thread alive
                log.exception("outbox publisher step failed")
                self._stop.wait(1.0)

    def _on_ack(self, seq: int, reason: int) -> None:
        # Runs on paho's network thread: record and return.
        self._acks.put((seq, reason))
        self._wake.set()

    def step(self) -> int:
        """Apply acknowledgements, then send what the window allows. Returns messages sent."""
        delivered: list[int] = []
        while True:
            try:
                seq, reason = self._acks.get_nowait()
            except queue.Empty:
                break
            self._inflight.pop(seq, None)
            if reason >= 0x80:  # the broker refused it (e.g. not authorized): retrying cannot help
                self.outbox.reject(seq, f"broker refused it with reason code {reason:#x}")
            else:
                delivered.append(seq)
        if delivered:
            self.outbox.ack(delivered)
            self.acked += len(delivered)
        t = self.transport
        if not t.connected:
            return 0
        cid = t.connection_id
        if any(c != cid for c in self._inflight.values()):
            # Sent on an earlier connection: paho resends those first. Sending new ones now
            # could overtake them, so wait for their PUBACKs (with a limit, in case paho lost them).
            now = time.monotonic()
            self._held_since = self._held_since or now
            if now - self._held_since < self.HOLD_TIMEOUT_S:
                return 0
            log.warning("outbox: %d message(s) unacknowledged %.0f s after reconnecting; sending them again",
                        len(self._inflight), now - self._held_since)
            self._last_sent = min(self._inflight) - 1
            self._inflight.clear()
        self._held_since = None
        room = min(self.window, t.send_window) - len(self._inflight)
        if room <= 0:
            return 0
        sent = 0
        for row in self.outbox.peek(self._last_sent, room):
            try:
                t.publish(row.topic, row.payload, row.qos, on_ack=functools.partial(self._on_ack, row.seq))
            except Undeliverable as exc:
                self.outbox.reject(row.seq, str(exc))
                self._last_sent = row.seq
                continue
            except JetagentError as exc:  # not connected after all, paho's queue full: try again later
                log.debug("outbox: publish of %d deferred: %s", row.seq, exc)
                break
            self._inflight[row.seq] = cid
            self._last_sent = row.seq
            sent += 1
        self.sent += sent
        return sent

    def drained(self) -> bool:
        return not self._inflight and self.outbox.stats()["queued"] == 0
