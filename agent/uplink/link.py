"""The device's MQTT 5 link to the fleet broker: the only device module that imports paho
(with agent.mqtt, the plumbing it shares with jetfleet).

Each setting here fixes a measured failure of paho's or Mosquitto's defaults (FACTS.md):

* callback API v2, `connect_async` + `loop_start`: the agent serves frames whether or not
  the broker is there, and paho reconnects by itself, with backoff (`reconnect_delay_set`)
  and our jitter on top so a fleet that lost its broker does not return in lockstep;
* a Session Expiry Interval with clean_start=False: commands sent while the device was
  away are delivered when it comes back (without it the broker forgets them);
* subscriptions are (re)made in `on_connect`, and only on success;
* TCP_NODELAY on the socket (paho never sets it: 88 ms -> 1 ms request/response);
* a bound on paho's own queue (`max_queued_messages_set`; unlimited by default);
* the CONNACK's Maximum Packet Size and Receive Maximum are read and enforced here
  (paho ignores both; an oversize QoS 1 publish reconnects and resends forever);
* callbacks only parse and hand over: inbound messages go to registered sinks that
  must just enqueue, and connect events go to listeners on the link's own thread.
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import FleetConfig
from agent.mqtt import (
    MQTT_MAX_PACKET,
    MqttConfigError,
    configure_tls,
    parse_broker_url,
    publish_packet_size,
    publish_properties,
    set_nodelay,
    to_inbound,
)
from agent.uplink.outbox import Undeliverable
from agent.wire.chunks import INBOUND_MAX_PACKET
from agent.wire.core import Inbound
from engines.errors import JetagentError

log = logging.getLogger(__name__)

PAHO_MAX_QUEUED = 1000  # paho's own queue; the outbox keeps the real backlog on disk
PAHO_MAX_INFLIGHT = 20  # Mosquitto's default Receive Maximum


class LinkError(JetagentError):
    """The link cannot do what was asked (bad TLS files, not connected, queue full)."""


class PacketTooLarge(Undeliverable, LinkError):
    """A publish larger than the broker's Maximum Packet Size; refused before it is sent."""


@dataclass(frozen=True)
class ConnectInfo:
    """What the broker's CONNACK said."""

    connection_id: int
    session_present: bool
    max_packet_size: int
    receive_maximum: int


Sink = Callable[[Inbound], None]
AckCallback = Callable[[int], None]


def jittered(base: float, cap: float, rng: random.Random) -> tuple[float, float]:
    """Reconnect delay bounds scaled by one random factor in [0.5, 1): paho doubles from the
    first up to the second; different devices get different ladders."""
    f = 0.5 + rng.random() / 2
    return base * f, max(base, cap) * f


def check_fleet(cfg: FleetConfig, device_id: str) -> str:
    """Validate the [fleet] settings without connecting (loads the TLS files); one line for --check-config."""
    FleetLink(cfg, device_id, will_topic="check", will_payload=b"")
    tls = "none"
    if cfg.tls is not None:
        tls = "mutual (client certificate)" if cfg.tls.cert else "server-verified"
        tls += ", hostname NOT checked" if cfg.tls.insecure else ""
    auth = f"user {cfg.username}" if cfg.username else "no user name"
    return f"fleet: {cfg.broker} as {device_id}, prefix {cfg.prefix!r}, TLS {tls}, {auth}"


class FleetLink:
    """One MQTT 5 connection for one device (client id = device id)."""

    def __init__(self, cfg: FleetConfig, device_id: str, *, will_topic: str, will_payload: bytes,
                 reconnect: tuple[float, float] = (1.0, 60.0), seed: int | None = None) -> None:
        self.cfg = cfg
        self.device_id = device_id
        try:
            self.host, self.port, url_tls = parse_broker_url(cfg.broker)
        except MqttConfigError as exc:
            raise LinkError(str(exc)) from None
        self._rng = random.Random(seed)
        self._reconnect = reconnect
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        c.max_queued_messages_set(PAHO_MAX_QUEUED)
        c.max_inflight_messages_set(PAHO_MAX_INFLIGHT)
        if cfg.username is not None:
            c.username_pw_set(cfg.username, cfg.password)
        if cfg.tls is not None or url_tls:
            if cfg.tls is None:
                raise LinkError(f"{cfg.broker}: mqtts:// needs TLS settings")
            t = cfg.tls
            try:
                configure_tls(c, ca=t.ca, cert=t.cert, key=t.key, insecure=t.insecure)
            except MqttConfigError as exc:
                raise LinkError(str(exc)) from exc
        c.will_set(will_topic, will_payload, qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_socket_open = self._on_socket_open
        self._client = c
        self._set_backoff()
        self._lock = threading.Lock()
        self._subs: dict[str, tuple[int, Sink]] = {}
        self._acks: dict[int, AckCallback | None] = {}
        self._early: dict[int, int] = {}  # PUBACKs that beat publish() back to its caller
        self._events: queue.SimpleQueue[ConnectInfo | str | None] = queue.SimpleQueue()
        self._listeners: list[Callable[[ConnectInfo], None]] = []
        self._event_thread: threading.Thread | None = None
        self._connected = threading.Event()
        self.info = ConnectInfo(0, False, MQTT_MAX_PACKET, PAHO_MAX_INFLIGHT)
        self.connection_id = 0
        self.last_error = ""
        self.dropped_inbound = 0
        self.connect_failures = 0
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        props.MaximumPacketSize = INBOUND_MAX_PACKET
        props.ReceiveMaximum = 64
        self._event_thread = threading.Thread(target=self._event_loop, name="mqtt-events", daemon=True)
        self._event_thread.start()
        self._client.connect_async(self.host, self.port, keepalive=self.cfg.keepalive_s,
                                   clean_start=False, properties=props)
        self._client.loop_start()
        log.info("fleet link: connecting to %s as %s", self.cfg.broker, self.device_id)

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 3.0) -> None:
        """Publish `final` (retained, QoS 1) if connected and wait for its PUBACK, then disconnect
        normally (so the broker does not send the will) and stop paho's thread."""
        self._stopping = True
        if final is not None and self.connected:
            try:
                info = self._client.publish(final[0], final[1], qos=1, retain=True)
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                log.warning("fleet link: final state not delivered: %s", exc)
        self._client.disconnect()
        self._client.loop_stop()
        self._events.put(None)
        if self._event_thread is not None:
            self._event_thread.join(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def max_packet_size(self) -> int:
        """The largest packet the broker takes (its CONNACK's Maximum Packet Size)."""
        return self.info.max_packet_size

    @property
    def send_window(self) -> int:
        """Unacknowledged QoS 1 publishes the broker allows (its Receive Maximum), less room
        for state and command replies."""
        return max(1, min(self.info.receive_maximum, PAHO_MAX_INFLIGHT) - 4)

    def nodelay(self) -> bool:
        sock: Any = self._client.socket()
        return bool(sock is not None and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    def add_listener(self, on_connected: Callable[[ConnectInfo], None]) -> None:
        """Call `on_connected` on the link's event thread after each successful connect."""
        self._listeners.append(on_connected)

    def subscribe(self, topic_filter: str, sink: Sink, qos: int = 1) -> None:
        """Deliver matching messages to `sink` (called on paho's thread: it must only enqueue).
        Made now if connected, and again on every connect."""
        with self._lock:
            self._subs[topic_filter] = (qos, sink)
        if self.connected:
            self._client.subscribe(topic_filter, qos)

    # -- publishing ---------------------------------------------------------------------
    def unsubscribe(self, topic_filter: str) -> None:
        """Stop delivering `topic_filter` (and stop re-subscribing it on connect)."""
        with self._lock:
            known = self._subs.pop(topic_filter, None) is not None
        if known and self.connected:
            self._client.unsubscribe(topic_filter)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, *,
                on_ack: AckCallback | None = None, correlation_data: bytes | None = None,
                response_topic: str | None = None) -> None:
        """Hand one message to paho. `on_ack(reason_code)` runs on paho's thread at PUBACK.

        Raises PacketTooLarge over the broker's limit, LinkError when paho refuses it.
        While disconnected, QoS 1 messages wait in paho's bounded queue.
        """
        props = publish_properties(correlation_data, response_topic)
        size = publish_packet_size(topic, payload, qos, props)
        if size > self.max_packet_size:
            raise PacketTooLarge(f"a {size}-byte publish to {topic} is over the broker's maximum packet size "
                                 f"of {self.max_packet_size} bytes")
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except ValueError as exc:  # a topic with wildcards, a bad QoS
            raise LinkError(f"cannot publish to {topic!r}: {exc}") from exc
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise LinkError(f"paho's queue is full ({PAHO_MAX_QUEUED} messages); not sent to {topic}")
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise LinkError(f"cannot publish to {topic}: {mqtt.error_string(info.rc)}")
        if qos == 0:
            return  # no PUBACK to wait for
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._acks[info.mid] = on_ack
        if early is not None and on_ack is not None:
            on_ack(early)

    # -- paho callbacks (network thread): record, hand over, return ---------------------
    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        set_nodelay(sock)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if reason.is_failure:
            self.last_error = f"broker refused the connection: {reason}"
            log.warning("fleet link: %s", self.last_error)
            return
        mps = getattr(properties, "MaximumPacketSize", MQTT_MAX_PACKET)
        rmax = getattr(properties, "ReceiveMaximum", 65535)
        self.connection_id += 1
        self.info = ConnectInfo(self.connection_id, bool(flags.session_present), int(mps), int(rmax))
        self.last_error = ""
        self.connect_failures = 0
        with self._lock:
            subs = [(t, q) for t, (q, _) in self._subs.items()]
        if subs:
            client.subscribe(subs)
        self._connected.set()
        self._events.put(self.info)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Properties | None) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and reason.is_failure:  # (a refused CONNECT already said why)
            self.last_error = f"disconnected: {reason}"
        if was and self._stopping:
            log.info("fleet link: disconnected from %s", self.cfg.broker)
        elif was:
            log.warning("fleet link: disconnected from %s (%s); reconnecting", self.cfg.broker, reason)
        self._set_backoff()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self.connect_failures += 1
        self.last_error = self.last_error or f"cannot connect to {self.cfg.broker}"
        n = self.connect_failures
        if n & (n - 1) == 0:  # 1, 2, 4, 8, ...: said, but not every few seconds for hours
            log.warning("fleet link: cannot connect to %s (attempt %d); retrying with backoff; reports wait "
                        "in the outbox", self.cfg.broker, n)
        self._set_backoff()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        with self._lock:
            if mid in self._acks:
                cb = self._acks.pop(mid)
            else:
                self._early[mid] = reason.value
                if len(self._early) > 4 * PAHO_MAX_QUEUED:  # QoS 0 sends are never claimed
                    self._early.pop(next(iter(self._early)))
                return
        if cb is not None:
            try:
                cb(reason.value)
            except Exception:  # never let a consumer's bug kill paho's thread
                log.exception("fleet link: ack callback failed")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        inbound = to_inbound(msg)
        with self._lock:
            sinks = [s for t, (_, s) in self._subs.items() if mqtt.topic_matches_sub(t, msg.topic)]
        for sink in sinks:
            try:
                sink(inbound)
            except Exception:
                self.dropped_inbound += 1
                log.exception("fleet link: a message sink failed on %s", msg.topic)

    # -- our own threads ----------------------------------------------------------------
    def _set_backoff(self) -> None:
        lo, hi = jittered(*self._reconnect, self._rng)
        # paho annotates these as int, but uses them as float seconds
        self._client.reconnect_delay_set(min_delay=lo, max_delay=hi)  # type: ignore[arg-type]

    def _event_loop(self) -> None:
        while True:
            ev = self._events.get()
            if ev is None:
                return
            if isinstance(ev, ConnectInfo):
                log.info("fleet link: connected to %s (session %s, max packet %d, receive max %d)",
                         self.cfg.broker, "resumed" if ev.session_present else "new", ev.max_packet_size,
                         ev.receive_maximum)
                for listener in list(self._listeners):
                    try:
                        listener(ev)
                    except Exception:
                        log.exception("fleet link: connect listener failed")
