"""jetfleet's MQTT 5 client (one of the three modules that import paho).

`FleetClient` connects synchronously (a CLI wants an answer or a clear error, not a
retry loop), subscribes and waits for the SUBACK, and sends commands with a response
topic and correlation data. Once connected it rides out broker restarts (paho
reconnects; the client subscribes again), records the CONNACK's Maximum Packet Size and
Receive Maximum (paho ignores both), and offers a non-blocking publish with a bounded
window of unacknowledged messages for `jetfleet serve`. Handlers receive
`agent.wire.core.Inbound` messages, never paho types.
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
from typing import Any, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

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
from agent.wire.core import Inbound, ProtocolError, Topics, encode
from agent.wire.device import check_reply, command_request
from engines.errors import JetagentError

log = logging.getLogger(__name__)

Handler = Callable[[Inbound], None]


class FleetError(JetagentError):
    """The broker cannot be reached, refused us, or a device did not answer."""


class TooLarge(FleetError):
    """A publish larger than the broker's Maximum Packet Size; refused before it is sent."""


def _match_filter(topic_filter: str) -> str:
    """The filter a message's topic is matched against: '$share/<group>/' removed."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


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
    """One synchronous-connecting MQTT 5 client for jetfleet commands.

    `max_inflight` bounds paho's unacknowledged QoS 1 messages (it never reads the
    broker's Receive Maximum); `publish_nowait` keeps at most twice that many handed to
    paho (in flight + queued), further bounded by the broker's Receive Maximum.
    """

    def __init__(self, opts: FleetOptions, *, max_inflight: int = 16) -> None:
        self.opts = opts
        self.topics = Topics(opts.prefix)
        try:
            self.host, self.port, url_tls = parse_broker_url(opts.broker)
        except MqttConfigError as exc:
            raise FleetError(str(exc)) from None
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=opts.client_id, protocol=mqtt.MQTTv5)
        c.max_queued_messages_set(1000)
        c.max_inflight_messages_set(max(1, max_inflight))
        c.reconnect_delay_set(1, 30)
        if opts.username is not None:
            c.username_pw_set(opts.username, opts.password)
        if url_tls or opts.tls_ca or opts.tls_cert:
            if (opts.tls_cert is None) != (opts.tls_key is None):
                raise FleetError("--tls-cert and --tls-key must be given together")
            try:
                configure_tls(c, ca=opts.tls_ca, cert=opts.tls_cert, key=opts.tls_key, insecure=opts.tls_insecure,
                              where="TLS")
            except MqttConfigError as exc:
                raise FleetError(str(exc)) from exc
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.on_socket_open = lambda client, userdata, sock: set_nodelay(sock)
        self._client = c
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._connack: ReasonCode | None = None
        self._dropped: str | None = None
        self._subacks: dict[int, threading.Event] = {}
        self._subreasons: dict[int, list[ReasonCode]] = {}
        self._handlers: list[tuple[str, Handler]] = []
        self._subs: dict[str, int] = {}  # filter -> qos, subscribed again after a reconnect
        self.connects = 0
        self.max_packet_size = MQTT_MAX_PACKET  # from the CONNACK
        self.receive_maximum = 65535
        self.max_inflight = max(1, max_inflight)
        # publish_nowait's window: mids handed to paho and not yet acknowledged
        self._window = threading.Condition()
        self._pending: set[int] = set()
        self._early: set[int] = set()  # acknowledged before publish() returned their mid
        self.puback_failures = 0

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

    @property
    def connected(self) -> bool:
        return bool(self._client.is_connected())

    @property
    def window(self) -> int:
        """How many publish_nowait messages may be unacknowledged at once."""
        return max(1, min(2 * self.max_inflight, self.receive_maximum))

    @property
    def in_flight(self) -> int:
        with self._window:
            return len(self._pending)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        self._connack = reason
        if reason.is_failure:
            if self._connected.is_set():
                log.warning("jetfleet: %s refused the reconnection: %s", self.opts.broker, reason)
            return
        self.max_packet_size = int(getattr(properties, "MaximumPacketSize", MQTT_MAX_PACKET))
        self.receive_maximum = int(getattr(properties, "ReceiveMaximum", 65535))
        self.connects += 1
        if self.connects > 1:
            log.info("jetfleet: reconnected to %s", self.opts.broker)
            with self._lock:
                subs = list(self._subs.items())
            if subs:  # a clean session: the broker forgot them
                client.subscribe(subs)
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Properties | None) -> None:
        if not self._connected.is_set():
            self._dropped = str(reason)
        elif reason.is_failure:
            log.warning("jetfleet: lost the connection to %s (%s); reconnecting", self.opts.broker, reason)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                      properties: Properties | None) -> None:
        with self._lock:
            ev = self._subacks.get(mid)
            self._subreasons[mid] = list(reasons)
        if ev is not None:
            ev.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if reason.is_failure:
            self.puback_failures += 1
            log.debug("jetfleet: the broker refused publish %d: %s", mid, reason)
        with self._window:
            if mid in self._pending:
                self._pending.discard(mid)
                self._window.notify_all()
            else:
                self._early.add(mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            handlers = [h for t, h in self._handlers if mqtt.topic_matches_sub(_match_filter(t), msg.topic)]
        if not handlers:
            return
        inbound = to_inbound(msg)
        for h in handlers:
            try:
                h(inbound)
            except Exception:  # one bad handler must not kill paho's thread
                log.exception("jetfleet: handler failed on %s", msg.topic)

    # -- use ----------------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, timeout: float = 5.0, *,
                  require_grant: bool = False) -> None:
        """Subscribe and wait for the SUBACK (so retained messages are on their way).

        With `require_grant`, a SUBACK that refuses the subscription (an ACL, a broker
        without shared subscriptions) raises FleetError naming the reason.
        """
        with self._lock:
            self._handlers.append((topic_filter, handler))
            self._subs[topic_filter] = qos
        ev = threading.Event()
        with self._lock:
            rc, mid = self._client.subscribe(topic_filter, qos)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                raise FleetError(f"cannot subscribe to {topic_filter}: {mqtt.error_string(rc)}")
            self._subacks[mid] = ev
        if not ev.wait(timeout):
            raise FleetError(f"no SUBACK for {topic_filter} within {timeout:g} s")
        with self._lock:
            reasons = self._subreasons.pop(mid, [])
            self._subacks.pop(mid, None)
        refused = [r for r in reasons if r.is_failure]
        if require_grant and refused:
            raise FleetError(f"the broker refused the subscription to {topic_filter}: {refused[0]}")

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop delivering `topic_filter` to its handlers (does not wait for the UNSUBACK)."""
        with self._lock:
            self._handlers = [(t, h) for t, h in self._handlers if t != topic_filter]
            known = self._subs.pop(topic_filter, None) is not None
        if known:
            self._client.unsubscribe(topic_filter)

    def publish_nowait(self, topic: str, payload: bytes | bytearray, *, qos: int = 1, retain: bool = False,
                       correlation_data: bytes | None = None, response_topic: str | None = None,
                       timeout: float = 30.0, stop: threading.Event | None = None) -> None:
        """Hand one message to paho without waiting for its PUBACK.

        Blocks only while `window` messages are unacknowledged (backpressure: a slow
        broker or subscriber slows the caller instead of filling memory). Never call it
        from a paho callback. Raises TooLarge over the broker's Maximum Packet Size and
        FleetError when paho refuses it or the window stays full for `timeout` s.
        """
        props = publish_properties(correlation_data, response_topic)
        size = publish_packet_size(topic, cast(bytes, payload), qos, props)  # it only takes len()
        if size > self.max_packet_size:
            raise TooLarge(f"a {size}-byte publish to {topic} is over the broker's maximum packet size "
                           f"({self.max_packet_size} bytes)")
        deadline = time.monotonic() + timeout
        with self._window:
            while len(self._pending) >= self.window:
                if stop is not None and stop.is_set():
                    raise FleetError("stopped while waiting for the broker to acknowledge")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FleetError(f"the broker acknowledged none of {len(self._pending)} messages "
                                     f"within {timeout:g} s")
                self._window.wait(min(left, 0.25))
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except ValueError as exc:
            raise FleetError(f"publish to {topic} refused: {exc}") from exc
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE or (qos == 0 and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS):
            raise FleetError(f"publish to {topic} not queued: {mqtt.error_string(info.rc)}")
        if qos == 0:
            return
        # QoS 1 while disconnected (MQTT_ERR_NO_CONN): paho keeps it and sends it after reconnecting
        with self._window:
            if info.mid in self._early:
                self._early.discard(info.mid)
            else:
                self._pending.add(info.mid)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every publish_nowait message is acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._window:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._window.wait(min(left, 0.25))
        return True

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, *,
                correlation_data: bytes | None = None, response_topic: str | None = None,
                timeout: float = 5.0) -> None:
        """Publish and wait for the broker's acknowledgement (TooLarge over its packet limit)."""
        properties = publish_properties(correlation_data, response_topic)
        size = publish_packet_size(topic, payload, qos, properties)
        if size > self.max_packet_size:
            raise TooLarge(f"a {size}-byte publish to {topic} is over the broker's maximum packet size "
                           f"({self.max_packet_size} bytes)")
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise FleetError(f"publish to {topic} failed: {exc}") from exc
        if not info.is_published():
            raise FleetError(f"publish to {topic} not acknowledged within {timeout:g} s")
        with self._window:
            self._early.discard(info.mid)  # its PUBACK was recorded as an early one

    def request(self, device_id: str, payload: bytes, timeout: float = 5.0) -> dict[str, Any]:
        """Send raw bytes to a device's command topic; wait for the reply with our correlation data."""
        reply_topic = self.topics.cmd_reply(device_id, self.opts.client_id)
        correlation = uuid.uuid4().bytes
        got: list[bytes] = []
        done = threading.Event()

        def on_reply(msg: Inbound) -> None:
            if msg.correlation_data == correlation:
                got.append(msg.payload)
                done.set()

        self.subscribe(reply_topic, on_reply)
        self.publish(self.topics.cmd(device_id), payload, correlation_data=correlation, response_topic=reply_topic)
        if not done.wait(timeout):
            raise FleetError(f"no reply from {device_id} within {timeout:g} s (is it online? see `jetfleet status`)")
        try:
            return check_reply(got[0])
        except ProtocolError as exc:
            raise FleetError(f"{device_id} sent a malformed reply: {exc}") from exc

    def command(self, device_id: str, cmd: str, args: Mapping[str, Any] | None = None,
                timeout: float = 5.0) -> dict[str, Any]:
        return self.request(device_id, encode(command_request(cmd, args)), timeout)
