"""The fleet model: one row per device from retained device states and live health reports.

`FleetView` folds `{p}/dev/+/state` (retained) and `{p}/dev/+/health` into one record
per device; `device_row` and `format_table` are what `jetfleet status` and `watch` print.
No MQTT here: `FleetView.apply` takes (topic, payload), so it is tested without a broker.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.wire.core import Inbound, ProtocolError, Topics
from agent.wire.device import check_health, check_state

if TYPE_CHECKING:
    from agent.jetfleet.client import FleetClient

log = logging.getLogger(__name__)


@dataclass
class DeviceRecord:
    device_id: str
    state: dict[str, Any] | None = None
    health: dict[str, Any] | None = None
    seqs: int = 0  # health reports seen


def _join(values: list[Any]) -> str | None:
    seen = [str(v) for v in dict.fromkeys(values) if v]
    return ",".join(seen) if seen else None


class FleetView:
    """Devices from `{p}/dev/+/state` (retained) and `{p}/dev/+/health`. Thread-safe."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self._lock = threading.Lock()
        self.devices: dict[str, DeviceRecord] = {}
        self.invalid = 0
        self.last_rx = 0.0  # time.monotonic() of the newest message

    def subscribe(self, client: FleetClient, health: bool = True) -> None:
        client.subscribe(self.topics.all_states(), self.on_message)
        if health:
            client.subscribe(self.topics.all_health(), self.on_message)

    def on_message(self, msg: Inbound) -> None:
        """FleetClient's handler (paho's thread)."""
        self.apply(msg.topic, msg.payload)

    def apply(self, topic: str, payload: bytes) -> None:
        parsed = self.topics.parse_dev(topic)
        if parsed is None or parsed[1] not in ("state", "health"):
            return
        device_id, leaf = parsed
        self.last_rx = time.monotonic()
        if not payload:  # a cleared retained state: the device was removed
            with self._lock:
                self.devices.pop(device_id, None)
            return
        try:
            msg = check_state(payload) if leaf == "state" else check_health(payload)
        except ProtocolError as exc:
            self.invalid += 1
            log.debug("jetfleet: ignoring %s: %s", topic, exc)
            return
        if msg["device_id"] != device_id:
            self.invalid += 1
            log.debug("jetfleet: %s carries device_id %r; ignored", topic, msg["device_id"])
            return
        with self._lock:
            rec = self.devices.setdefault(device_id, DeviceRecord(device_id))
            if leaf == "state":
                rec.state = msg
            elif rec.health is None or (msg.get("boot"), msg["seq"]) >= (rec.health.get("boot"), rec.health["seq"]):
                rec.health = msg
                rec.seqs += 1

    def record(self, device_id: str) -> DeviceRecord | None:
        """A copy of one device's record (None if never seen)."""
        with self._lock:
            rec = self.devices.get(device_id)
            return None if rec is None else DeviceRecord(rec.device_id, rec.state, rec.health, rec.seqs)

    def records(self) -> list[DeviceRecord]:
        with self._lock:
            return [DeviceRecord(r.device_id, r.state, r.health, r.seqs) for r in self.devices.values()]

    def settle(self, quiet_s: float = 0.3, max_s: float = 2.0) -> None:
        """Wait until messages stop arriving for `quiet_s` (retained ones come in a burst), at most `max_s`."""
        start = time.monotonic()
        self.last_rx = max(self.last_rx, start)
        while True:
            now = time.monotonic()
            if now - self.last_rx >= quiet_s or now - start >= max_s:
                return
            time.sleep(0.02)

    def rows(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        with self._lock:
            records = sorted(self.devices.values(), key=lambda r: r.device_id)
            return [device_row(r, now) for r in records]


def device_row(rec: DeviceRecord, now: float) -> dict[str, Any]:
    """One device as `jetfleet status --json` prints it."""
    st, h = rec.state or {}, rec.health
    summary = st.get("summary") or {}
    cameras = st.get("cameras") or []
    ts_state = float(st.get("ts", 0.0))
    fresh_health = h is not None and float(h["ts"]) >= ts_state and st.get("state", "online") == "online"
    if fresh_health and h is not None:
        cams = h["cameras"]
        fps: Any = round(sum(float(c.get("fps", 0.0)) for c in cams), 2)
        p99s = [c.get("latency_ms", {}).get("total", {}).get("p99") for c in cams]
        p99s = [p for p in p99s if isinstance(p, (int, float))]
        p99 = max(p99s) if p99s else None
        temp = h["system"].get("temp_max_c")
        cameras = cams
    else:
        fps, p99, temp = summary.get("fps"), summary.get("p99_ms"), summary.get("temp_c")
    if st.get("state", "online") != "online":
        fps, p99 = None, None  # a stopped or lost device serves nothing, whatever it last said
    last_seen = max([ts_state] + ([float(h["ts"])] if h is not None else []))
    state = st.get("state", "unknown")
    interval = float(st.get("interval_s") or 30.0)
    return {
        "device_id": rec.device_id,
        "state": state,
        "model": _join([c.get("model") for c in cameras]),
        "precision": _join([c.get("precision") for c in cameras]),
        "backend": _join([c.get("backend") for c in cameras]),
        "fps": fps,
        "p99_ms": p99,
        "temp_c": temp,
        "last_seen": last_seen or None,
        "age_s": round(now - last_seen, 1) if last_seen else None,
        "stale": state == "online" and last_seen > 0 and now - last_seen > 3 * interval + 10,
        "boot": st.get("boot", h.get("boot") if h else None),
        "agent_version": st.get("agent_version"),
        "cameras": len(cameras),
        "seq": h["seq"] if h is not None else None,
        "outbox_dropped": (h["outbox"].get("dropped") if h is not None else summary.get("outbox_dropped")),
    }


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 90:
        return f"{s:.0f}s ago"
    if s < 5400:
        return f"{s / 60:.0f}m ago"
    if s < 129600:
        return f"{s / 3600:.0f}h ago"
    return f"{s / 86400:.0f}d ago"


def _num(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("DEVICE", "STATE", "MODEL", "PRECISION", "FPS", "P99 MS", "TEMP C", "LAST SEEN")
    body = [(r["device_id"], r["state"] + (" (stale)" if r["stale"] else ""), r["model"] or "-",
             r["precision"] or "-", _num(r["fps"], ".1f"), _num(r["p99_ms"], ".1f"), _num(r["temp_c"], ".1f"),
             _age(r["age_s"])) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in (head, *body)]
    if not rows:
        lines.append("(no devices)")
    return "\n".join(lines)
