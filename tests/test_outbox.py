"""The on-disk outbox and its publisher (with a fake transport at our own seam)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.uplink.outbox import Outbox, OutboxError, OutboxPublisher, Undeliverable


def body(seq: int, size: int = 0) -> bytes:
    return json.dumps({"seq": seq, "pad": "x" * size}).encode()


def put_n(box: Outbox, n: int, size: int = 0) -> list[int]:
    return [box.put("t/health", lambda s: body(s, size)) for _ in range(n)]


def test_seq_is_contiguous_and_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "outbox.sqlite"
    box = Outbox(db)
    assert put_n(box, 3) == [1, 2, 3]
    assert [json.loads(r.payload)["seq"] for r in box.peek()] == [1, 2, 3]
    box.ack([1, 2, 3])
    box.close()
    box = Outbox(db)  # a new process: the counter goes on, it does not restart at 1
    assert put_n(box, 2) == [4, 5]
    assert [r.seq for r in box.peek()] == [4, 5]
    box.close()


def test_undelivered_messages_survive_a_restart_in_order(tmp_path: Path) -> None:
    db = tmp_path / "outbox.sqlite"
    box = Outbox(db)
    put_n(box, 5)
    box.ack([1, 3])
    box.close()
    box = Outbox(db)
    assert [r.seq for r in box.peek()] == [2, 4, 5]
    assert [r.seq for r in box.peek(after_seq=2, limit=1)] == [4]
    assert box.stats()["queued"] == 3
    box.close()


def test_durability_settings(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    box.close()


def test_count_bound_drops_oldest_and_counts_them_persistently(tmp_path: Path) -> None:
    db = tmp_path / "o.sqlite"
    box = Outbox(db, max_messages=3)
    put_n(box, 7)
    assert [r.seq for r in box.peek()] == [5, 6, 7]
    assert box.stats()["dropped"] == 4 and box.stats()["queued"] == 3
    box.close()
    box = Outbox(db, max_messages=3)
    assert box.stats()["dropped"] == 4
    box.close()


def test_byte_bound_drops_oldest(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_messages=1000, max_bytes=1000)
    put_n(box, 5, size=300)  # ~320 bytes each: three fit
    st = box.stats()
    assert st["bytes"] <= 1000 and st["queued"] == 3 and st["dropped"] == 2
    assert [r.seq for r in box.peek()] == [3, 4, 5]
    # one that can never fit is dropped on arrival, and its seq is not reused
    assert box.put("t", lambda s: body(s, 5000)) == 6
    assert box.stats()["dropped"] == 3 and box.put("t", body) == 7
    box.close()


def test_smaller_bound_on_restart_trims_at_once(tmp_path: Path) -> None:
    db = tmp_path / "o.sqlite"
    box = Outbox(db)
    put_n(box, 10)
    box.close()
    box = Outbox(db, max_messages=4)
    assert [r.seq for r in box.peek(limit=100)] == [7, 8, 9, 10] and box.stats()["dropped"] == 6
    box.close()


def test_corrupt_file_is_moved_aside_and_the_agent_goes_on(tmp_path: Path) -> None:
    db = tmp_path / "o.sqlite"
    db.write_bytes(b"this is not a database" * 200)
    box = Outbox(db)
    assert box.put("t", body) == 1
    box.close()
    assert list(tmp_path.glob("o.sqlite.corrupt-*"))


def test_ack_of_unknown_rows_is_harmless(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_messages=2)
    put_n(box, 4)  # 1 and 2 dropped while (say) in flight
    assert box.ack([1, 2, 3]) == 1
    assert box.stats()["queued"] == 1
    box.close()


def test_a_failed_write_raises_a_specific_error_and_uses_no_seq(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    box.put("t", body)
    box._db.execute("PRAGMA query_only = ON")  # every write now fails, like a full disk
    with pytest.raises(OutboxError, match="cannot store message"):
        box.put("t", body)
    box._db.execute("PRAGMA query_only = OFF")
    assert box.put("t", body) == 2
    assert box.stats()["queued"] == 2
    box.close()


class FakeTransport:
    """The link seam: records publishes; the test decides when PUBACKs come."""

    def __init__(self, window: int = 20, limit: int = 1 << 20) -> None:
        self.connected = True
        self.connection_id = 1
        self.send_window = window
        self.limit = limit
        self.sent: list[tuple[int, int]] = []  # (seq, connection id)
        self.pending: list[Callable[[int], None]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, *,
                on_ack: Callable[[int], None] | None = None) -> None:
        if len(payload) > self.limit:
            raise Undeliverable(f"{len(payload)} bytes is over {self.limit}")
        self.sent.append((json.loads(payload)["seq"], self.connection_id))
        if on_ack is not None:
            self.pending.append(on_ack)

    def ack_all(self, reason: int = 0) -> None:
        acks, self.pending = self.pending, []
        for a in acks:
            a(reason)


def test_publisher_sends_in_order_within_the_window_and_deletes_on_ack(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    t = FakeTransport()
    pub = OutboxPublisher(box, t, window=4)
    put_n(box, 10)
    assert pub.step() == 4 and pub.step() == 0  # window full until PUBACKs
    assert [s for s, _ in t.sent] == [1, 2, 3, 4]
    assert box.stats()["queued"] == 10  # nothing deleted before its PUBACK
    t.ack_all()
    assert pub.step() == 4 and box.stats()["queued"] == 6
    t.ack_all()
    pub.step()
    t.ack_all()
    pub.step()
    assert [s for s, _ in t.sent] == list(range(1, 11)) and pub.drained()


def test_publisher_waits_while_disconnected_and_after_reconnect_lets_paho_resend_first(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    t = FakeTransport()
    pub = OutboxPublisher(box, t, window=8)
    put_n(box, 3)
    pub.step()  # 1..3 handed to paho, then the connection drops before PUBACK
    t.connected = False
    put_n(box, 4)
    assert pub.step() == 0
    t.connected, t.connection_id = True, 2
    assert pub.step() == 0, "new messages must not overtake the ones paho resends"
    t.ack_all()  # paho's resends acknowledged
    assert pub.step() == 4
    assert [s for s, _ in t.sent] == [1, 2, 3, 4, 5, 6, 7]


def test_publisher_resends_itself_if_paho_never_acks_after_reconnect(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    t = FakeTransport()
    pub = OutboxPublisher(box, t, window=8)
    pub.HOLD_TIMEOUT_S = 0.0
    put_n(box, 2)
    pub.step()
    t.pending.clear()  # those PUBACKs will never come
    t.connection_id = 2
    pub.step()
    assert [s for s, _ in t.sent] == [1, 2, 1, 2]


def test_oversize_and_refused_messages_are_removed_and_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    t = FakeTransport(limit=200)
    pub = OutboxPublisher(box, t)
    box.put("t", body)
    box.put("t", lambda s: body(s, 500))
    box.put("t", body)
    pub.step()
    assert [s for s, _ in t.sent] == [1, 3]
    t.ack_all(reason=0x87)  # not authorized: retrying cannot help
    pub.step()
    st = box.stats()
    assert st["rejected"] == 3 and st["queued"] == 0
