"""The fleet model jetfleet prints: messages in, rows out (no broker needed)."""

from __future__ import annotations

import time
from typing import Any

from agent.jetfleet.view import FleetView, format_table
from agent.wire.core import Topics, encode
from agent.wire.device import state_message

T = Topics()
CAM = {"camera": "front", "model": "person", "sha256": "a" * 64, "backend": "onnxruntime", "precision": "int8"}


def state(device: str, st: str = "online", ts: float | None = None, **summary: Any) -> bytes:
    return encode(state_message(device_id=device, state=st, boot=3, connects=1, agent_version="0.1.0",
                                interval_s=30.0, cameras=[CAM], summary=summary, ts=ts))


def health(device: str, seq: int, ts: float, fps: float = 20.0, p99: float = 40.0) -> bytes:
    cam = {**CAM, "fps": fps, "latency_ms": {"total": {"p99": p99}}}
    return encode({"v": 1, "device_id": device, "seq": seq, "boot": 3, "ts": ts, "cameras": [cam],
                   "system": {"temp_max_c": 61.5}, "outbox": {"dropped": 2}})


def test_rows_from_retained_state_alone() -> None:
    v = FleetView(T)
    now = time.time()
    v.apply(T.state("b-2"), state("b-2", ts=now - 3, fps=12.5, p99_ms=80.0, temp_c=55.0))
    v.apply(T.state("a-1"), state("a-1", ts=now - 1, fps=30.0))
    rows = v.rows(now)
    assert [r["device_id"] for r in rows] == ["a-1", "b-2"]
    b = rows[1]
    assert (b["state"], b["model"], b["precision"], b["fps"], b["p99_ms"], b["temp_c"]) == (
        "online", "person", "int8", 12.5, 80.0, 55.0)
    assert b["last_seen"] == now - 3 and b["age_s"] == 3.0 and b["boot"] == 3 and not b["stale"]


def test_newer_health_wins_and_older_health_is_ignored() -> None:
    v = FleetView(T)
    now = time.time()
    v.apply(T.state("d"), state("d", ts=now - 10, fps=1.0))
    v.apply(T.health("d"), health("d", 8, now - 2, fps=25.0, p99=33.0))
    v.apply(T.health("d"), health("d", 7, now - 5, fps=3.0))  # a late redelivery
    row = v.rows(now)[0]
    assert row["fps"] == 25.0 and row["p99_ms"] == 33.0 and row["temp_c"] == 61.5
    assert row["seq"] == 8 and row["last_seen"] == now - 2 and row["outbox_dropped"] == 2


def test_lost_and_offline_devices_show_no_fps_and_stale_online_ones_are_flagged() -> None:
    v = FleetView(T)
    now = time.time()
    v.apply(T.state("lost"), state("lost", "lost", ts=now - 100))
    v.apply(T.state("off"), state("off", "offline", ts=now - 5, fps=30.0))
    v.apply(T.state("quiet"), state("quiet", ts=now - 500, fps=30.0))
    rows = {r["device_id"]: r for r in v.rows(now)}
    assert rows["lost"]["state"] == "lost" and rows["lost"]["fps"] is None and rows["lost"]["model"] == "person"
    assert rows["off"]["fps"] is None
    assert rows["quiet"]["stale"] is True and rows["off"]["stale"] is False
    table = format_table(list(rows.values()))
    assert "online (stale)" in table and "lost" in table and "8m ago" in table


def test_bad_messages_are_counted_and_ignored() -> None:
    v = FleetView(T)
    v.apply(T.state("x"), b"not json")
    v.apply(T.state("x"), encode({"v": 1, "device_id": "x", "state": "confused", "boot": 1, "ts": 1.0}))
    v.apply(T.state("x"), state("someone-else"))  # a device id that does not match the topic
    v.apply(T.health("x"), encode({"v": 1, "device_id": "x"}))
    v.apply("jetagent/dev/x/deploy", b"{}")  # not ours to read
    assert v.invalid == 4 and v.rows() == []
    assert format_table([]).endswith("(no devices)")


def test_an_empty_retained_state_removes_the_device() -> None:
    v = FleetView(T)
    v.apply(T.state("gone"), state("gone"))
    v.apply(T.state("gone"), b"")
    assert v.rows() == []


def test_the_examples_in_docs_protocol_md_pass_the_checks_readers_use() -> None:
    """docs/protocol.md is the wire contract: its examples must be messages we accept."""
    import re

    from agent.wire.device import check_health, check_reply, check_state, parse_command
    from conftest import ROOT

    text = (ROOT / "docs" / "protocol.md").read_text()
    sections = {m.group(1): m.start() for m in re.finditer(r"^## (\w[\w ]*)$", text, re.M)}
    blocks = [(m.start(), m.group(1)) for m in re.finditer(r"```json\n(.*?)```", text, re.S)]

    def in_section(name: str) -> list[str]:
        start = sections[name]
        end = min([p for p in sections.values() if p > start] + [len(text)])
        return [b for pos, b in blocks if start < pos < end]

    (state_example,) = in_section("State")
    assert check_state(state_example.encode())["state"] == "online"
    (health_example,) = in_section("Health")
    assert check_health(health_example.encode())["seq"] == 4711
    request, replies = in_section("Commands")
    assert parse_command(request.encode()) == ("restart-pipeline", {"camera": "front"})
    oks = [check_reply(line.encode())["ok"] for line in replies.strip().splitlines()]
    assert oks == [True, False]
