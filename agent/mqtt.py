"""MQTT 5 plumbing both clients share: the device's link (agent.uplink.link) and jetfleet's
client (agent.jetfleet.client). One of the three modules that import paho.

Broker URLs, TLS from plain file paths, exact PUBLISH sizes (paho ignores the broker's
Maximum Packet Size, so both clients check it themselves), request/reply properties,
TCP_NODELAY (paho never sets it), and the one conversion of a received paho message into
`agent.wire.core.Inbound`, so no paho type travels past the clients.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.wire.core import Inbound
from engines.errors import JetagentError

log = logging.getLogger(__name__)

MQTT_MAX_PACKET = 268435455 + 5  # the protocol's own limit (remaining length + fixed header)


class MqttConfigError(JetagentError):
    """A broker URL or TLS file that cannot be used; says which."""


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """mqtt://host[:port] or mqtts://host[:port] -> (host, port, tls)."""
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise MqttConfigError(f"broker URL must look like mqtt://host:1883 or mqtts://host:8883, not {url!r}")
    tls = u.scheme == "mqtts"
    try:
        port = u.port or (8883 if tls else 1883)
    except ValueError:
        raise MqttConfigError(f"broker URL has a bad port: {url!r}") from None
    return u.hostname, port, tls


def varint_len(n: int) -> int:
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


def publish_packet_size(topic: str, payload: bytes, qos: int, properties: Properties | None) -> int:
    """Exact size on the wire of an MQTT 5 PUBLISH."""
    props = len(properties.pack()) if properties is not None else 1
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + props + len(payload)
    return 1 + varint_len(remaining) + remaining


def publish_properties(correlation_data: bytes | None = None, response_topic: str | None = None,
                       ) -> Properties | None:
    """MQTT 5 PUBLISH properties for a request or a reply (None when there are none)."""
    if correlation_data is None and response_topic is None:
        return None
    props = Properties(PacketTypes.PUBLISH)
    if correlation_data is not None:
        props.CorrelationData = correlation_data
    if response_topic is not None:
        props.ResponseTopic = response_topic
    return props


def configure_tls(client: mqtt.Client, *, ca: Path | None, cert: Path | None, key: Path | None,
                  insecure: bool = False, where: str = "fleet.tls") -> None:
    """TLS for a paho client from plain file paths; errors name the files and `where` they came from."""
    try:
        client.tls_set(ca_certs=str(ca) if ca else None, certfile=str(cert) if cert else None,
                       keyfile=str(key) if key else None, cert_reqs=ssl.CERT_REQUIRED,
                       tls_version=ssl.PROTOCOL_TLS_CLIENT)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise MqttConfigError(f"{where}: cannot load CA/certificate/key ({ca}, {cert}, {key}): {exc}") from exc
    if insecure:
        client.tls_insecure_set(True)


def set_nodelay(sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:  # not a TCP socket (e.g. a websocket wrapper)
        log.debug("cannot set TCP_NODELAY: %s", exc)


def to_inbound(msg: mqtt.MQTTMessage) -> Inbound:
    """A received paho message as the clients hand it on: topic, payload, MQTT 5 reply properties."""
    props = msg.properties
    resp = getattr(props, "ResponseTopic", None)
    corr = getattr(props, "CorrelationData", None)
    return Inbound(msg.topic, bytes(msg.payload), resp if isinstance(resp, str) and resp else None,
                   bytes(corr) if isinstance(corr, (bytes, bytearray)) else None, bool(msg.retain))
