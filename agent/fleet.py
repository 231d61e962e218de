"""The operator's side of the link: a short-lived MQTT 5 client and the fleet model built
from retained device states and live health reports.

`FleetClient` connects synchronously (a CLI wants an answer or a clear error, not a
retry loop), subscribes and waits for the SUBACK, and sends commands with a response
topic and correlation data. `FleetView` folds state and health messages into one
row per device; it is what `jetfleet status` and `watch` print.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import TLSConfig
from agent.link import configure_tls, parse_broker_url, set_nodelay
from agent.protocol import ProtocolError, Topics, check_health, check_reply, check_state, command_request, encode
from engines.errors import JetagentError

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes, Properties | None], None]


class FleetError(JetagentError):
    """The broker cannot be reached, refused us, or a device did not answer."""


@dataclass(frozen=True)
class FleetOptions:
    broker: str = "mqtt://localhost:1883"
    prefix: str = "jetagent"
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_insecure: bool = False
    username: str | None = None
    password: str | None = None
    client_id: str = field(default_factory=lambda: f"jetfleet-{uuid.uuid4().hex[:12]}")


class FleetClient:
    """One synchronous-connecting MQTT 5 client for jetfleet commands."""

    def __init__(self, opts: FleetOptions) -> None:
        self.opts = opts
        self.topics = Topics(opts.prefix)
        self.host, self.port, url_tls = parse_broker_url(opts.broker)
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=opts.client_id, protocol=mqtt.MQTTv5)
        c.max_queued_messages_set(1000)
        if opts.username is not None:
            c.username_pw_set(opts.username, opts.password)
        if url_tls or opts.tls_ca or opts.tls_cert:
            if (opts.tls_cert is None) != (opts.tls_key is None):
                raise FleetError("--tls-cert and --tls-key must be given together")
            configure_tls(c, TLSConfig(ca=opts.tls_ca, cert=opts.tls_cert, key=opts.tls_key,
                                       insecure=opts.tls_insecure), where="TLS")
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_socket_open = lambda client, userdata, sock: set_nodelay(sock)
        self._client = c
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._connack: ReasonCode | None = None
        self._dropped: str | None = None
        self._subacks: dict[int, threading.Event] = {}
        self._handlers: list[tuple[str, Handler]] = []

    # -- connection ---------------------------------------------------------------------
    def connect(self, timeout: float = 5.0) -> FleetClient:
        try:
            self._client.connect(self.host, self.port, keepalive=30, clean_start=True)
        except ssl.SSLError as exc:
            raise FleetError(f"TLS handshake with {self.opts.broker} failed: {exc.reason or exc}") from exc
        except OSError as exc:
            raise FleetError(f"cannot connect to {self.opts.broker}: {exc.strerror or exc}") from exc
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        while not self._connected.wait(0.05):
            if self._connack is not None or self._dropped is not None or time.monotonic() > deadline:
                self.close()
                if self._connack is not None:
                    raise FleetError(f"{self.opts.broker} refused the connection: {self._connack}")
                if self._dropped is not None:
                    hint = " (is a client certificate required?)" if self.opts.broker.startswith("mqtts") else ""
                    raise FleetError(f"{self.opts.broker} closed the connection before accepting it: "
                                     f"{self._dropped}{hint}")
                raise FleetError(f"no answer from {self.opts.broker} within {timeout:g} s")
        return self

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        self._connack = reason
        if not reason.is_failure:
            self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Properties | None) -> None:
        if not self._connected.is_set():
            self._dropped = str(reason)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                      properties: Properties | None) -> None:
        with self._lock:
            ev = self._subacks.get(mid)
        if ev is not None:
            ev.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            handlers = [h for t, h in self._handlers if mqtt.topic_matches_sub(t, msg.topic)]
        for h in handlers:
            try:
                h(msg.topic, bytes(msg.payload), msg.properties)
            except Exception:  # one bad handler must not kill paho's thread
                log.exception("jetfleet: handler failed on %s", msg.topic)

    # -- use ----------------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, timeout: float = 5.0) -> None:
        """Subscribe and wait for the SUBACK (so retained messages are on their way)."""
        with self._lock:
            self._handlers.append((topic_filter, handler))
        ev = threading.Event()
        with self._lock:
            rc, mid = self._client.subscribe(topic_filter, qos)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                raise FleetError(f"cannot subscribe to {topic_filter}: {mqtt.error_string(rc)}")
            self._subacks[mid] = ev
        if not ev.wait(timeout):
            raise FleetError(f"no SUBACK for {topic_filter} within {timeout:g} s")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                properties: Properties | None = None, timeout: float = 5.0) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise FleetError(f"publish to {topic} failed: {exc}") from exc
        if not info.is_published():
            raise FleetError(f"publish to {topic} not acknowledged within {timeout:g} s")

    def request(self, device_id: str, payload: bytes, timeout: float = 5.0) -> dict[str, Any]:
        """Send raw bytes to a device's command topic; wait for the reply with our correlation data."""
        reply_topic = self.topics.cmd_reply(device_id, self.opts.client_id)
        correlation = uuid.uuid4().bytes
        got: list[bytes] = []
        done = threading.Event()

        def on_reply(topic: str, body: bytes, props: Properties | None) -> None:
            if getattr(props, "CorrelationData", None) == correlation:
                got.append(body)
                done.set()

        self.subscribe(reply_topic, on_reply)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = correlation
        self.publish(self.topics.cmd(device_id), payload, properties=props)
        if not done.wait(timeout):
            raise FleetError(f"no reply from {device_id} within {timeout:g} s (is it online? see `jetfleet status`)")
        try:
            return check_reply(got[0])
        except ProtocolError as exc:
            raise FleetError(f"{device_id} sent a malformed reply: {exc}") from exc

    def command(self, device_id: str, cmd: str, args: Mapping[str, Any] | None = None,
                timeout: float = 5.0) -> dict[str, Any]:
        return self.request(device_id, encode(command_request(cmd, args)), timeout)


# -- the fleet model ------------------------------------------------------------------------

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
        client.subscribe(self.topics.all_states(), self.apply)
        if health:
            client.subscribe(self.topics.all_health(), self.apply)

    def apply(self, topic: str, payload: bytes, props: Properties | None = None) -> None:
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
