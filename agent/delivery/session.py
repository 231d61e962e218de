"""The device's delivery session: the glue between the link (`FleetLink`) and the `Updater`.

* `MqttTransport`: the updater's Transport: block requests to `{p}/models/{sha}/get`
  with our reply topic, chunk frames back on `{p}/dev/{id}/reply/chunks`, and the
  retained signed manifest fetched on demand.
* `DesiredTracker`: the device's own desired state wins while it is present; without
  one, the most recently issued desired state of its groups applies. Each effective
  change goes to the updater (an empty retained payload clears a desired state).
* `DeviceDelivery`: wires both to the link and the updater, publishes deploy states
  (retained; the latest again after every reconnect) and registers `rollback`.

Everything here that runs on paho's thread only parses and enqueues.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.delivery.fetch import Chunk
from agent.delivery.updater import Updater
from agent.uplink.link import ConnectInfo, FleetLink, LinkError
from agent.wire.chunks import get_request, is_json, parse_chunk_frame, parse_server_error
from agent.wire.core import Inbound, ProtocolError, Topics, decode, encode
from agent.wire.deploy import FAILED, deploy_message
from agent.wire.desired import Desired

log = logging.getLogger(__name__)


class MqttTransport:
    def __init__(self, link: FleetLink, topics: Topics, device_id: str) -> None:
        self.link, self.topics, self.device_id = link, topics, device_id
        self.reply_topic = topics.reply(device_id, "chunks")
        self.chunk_sink: Callable[[Chunk], None] | None = None
        self.last_error = ""
        self.bad_frames = 0

    @property
    def connected(self) -> bool:
        return self.link.connected

    def request(self, sha256: str, indices: list[int], request_id: str) -> None:
        self.link.publish(self.topics.get(sha256), encode(get_request(self.device_id, indices)), qos=1,
                          response_topic=self.reply_topic, correlation_data=request_id.encode())

    def manifest(self, sha256: str, timeout: float, cancel: threading.Event) -> bytes | None:
        topic = self.topics.manifest(sha256)
        got: list[bytes] = []
        ready = threading.Event()

        def sink(msg: Inbound) -> None:
            if msg.payload:  # an empty retained payload is a deletion
                got.append(msg.payload)
                ready.set()

        self.link.subscribe(topic, sink)
        deadline = time.monotonic() + timeout
        try:
            while not ready.wait(0.2) and not cancel.is_set() and time.monotonic() < deadline:
                pass
        finally:
            self.link.unsubscribe(topic)
        return got[-1] if got else None

    def on_reply(self, msg: Inbound) -> None:
        """paho's thread: a chunk frame -> the updater's inbox; an error reply -> remembered."""
        if is_json(msg.payload):
            self.last_error = parse_server_error(msg.payload)
            log.warning("model server: %s", self.last_error)
            return
        try:
            sha, index, data = parse_chunk_frame(msg.payload)
        except ProtocolError:
            self.bad_frames += 1
            return
        if self.chunk_sink is not None:
            rid = msg.correlation_data.decode(errors="replace") if msg.correlation_data else ""
            self.chunk_sink(Chunk(sha, index, data, rid))


class DesiredTracker:
    """Which desired state applies: the device's own, else its groups' newest."""

    def __init__(self, topics: Topics, device_id: str, groups: tuple[str, ...],
                 submit: Callable[[Desired], None], reject: Callable[[str, str], None]) -> None:
        self.topics, self.device_id, self.groups = topics, device_id, groups
        self.submit, self.reject = submit, reject
        self._lock = threading.Lock()
        self._own: tuple[Desired, float] | None = None
        self._group: dict[str, tuple[Desired, float]] = {}
        self._applied = ""

    def topics_to_follow(self) -> list[str]:
        return [self.topics.desired(self.device_id)] + [self.topics.group_desired(g) for g in self.groups]

    def sink(self, msg: Inbound) -> None:
        """paho's thread: parse, update, maybe submit (the updater only enqueues)."""
        own = msg.topic == self.topics.desired(self.device_id)
        source = "device" if own else "group:" + msg.topic.split("/")[-2]
        entry: tuple[Desired, float] | None = None
        if msg.payload:
            try:
                desired = Desired.parse(decode(msg.payload, "desired"), source=source)
                entry = (desired, desired.issued)
            except ProtocolError as exc:
                job = _job_of(msg.payload)
                log.warning("desired state on %s refused: %s", msg.topic, exc)
                self.reject(job, f"desired state on {msg.topic} refused: {exc}")
                return
        with self._lock:
            if own:
                self._own = entry
            elif entry is None:
                self._group.pop(source, None)
            else:
                self._group[source] = entry
            effective = self._effective()
            if effective is None or effective.job == self._applied:
                return
            self._applied = effective.job
        self.submit(effective)

    def _effective(self) -> Desired | None:
        if self._own is not None:
            return self._own[0]
        if not self._group:
            return None
        return max(self._group.values(), key=lambda e: e[1])[0]


def _job_of(payload: bytes) -> str:
    try:
        raw = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "invalid"
    job = raw.get("job") if isinstance(raw, dict) else None
    return job if isinstance(job, str) and 0 < len(job) <= 128 else "invalid"


class DeviceDelivery:
    """The device's delivery session: subscriptions, the updater thread, deploy reports."""

    def __init__(self, link: FleetLink, topics: Topics, device_id: str, groups: tuple[str, ...],
                 make_updater: Callable[[MqttTransport, Callable[[dict[str, Any]], None]], Updater]) -> None:
        self.link, self.topics, self.device_id = link, topics, device_id
        self.transport = MqttTransport(link, topics, device_id)
        self.updater = make_updater(self.transport, self.publish_deploy)
        self.transport.chunk_sink = self.updater.on_chunk
        self.tracker = DesiredTracker(topics, device_id, groups, self.updater.submit, self._reject)
        self._last: Mapping[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Subscribe (made on every connect by the link) and start the updater's worker."""
        self.link.add_listener(self._on_connected)
        self.link.subscribe(self.transport.reply_topic, self.transport.on_reply, qos=1)
        for topic in self.tracker.topics_to_follow():
            self.link.subscribe(topic, self.tracker.sink, qos=1)
        self._thread = threading.Thread(target=self.updater.run, args=(self._stop,), name="updater", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.updater.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    def publish_deploy(self, msg: Mapping[str, Any]) -> None:
        """Retained deploy state; kept, and sent again on reconnect if the link is down now."""
        body = {**msg, "device_id": self.device_id}
        with self._lock:
            self._last = body
        if not self.link.connected:
            return
        try:
            self.link.publish(self.topics.deploy(self.device_id), encode(body), qos=1, retain=True)
        except LinkError as exc:
            log.warning("deploy state not published: %s", exc)

    def _on_connected(self, info: ConnectInfo) -> None:
        with self._lock:
            last = self._last
        if last is not None:
            self.publish_deploy(last)

    def _reject(self, job: str, reason: str) -> None:
        self.publish_deploy(deploy_message(job, FAILED, "", reason=reason))
