"""Acceptance: commands to a real agent process over a real Mosquitto. Good commands work;
garbage, wrong schemas, oversized and unknown commands (and anything hypothesis makes up)
get an error reply, and the agent keeps serving frames throughout."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.jetfleet.client import FleetClient, FleetOptions
from agent.wire.core import Inbound, Topics, encode
from agent.wire.device import MAX_CMD_BYTES
from broker import Broker
from conftest import color_frames, write_video
from fleet_helpers import AgentProcess, Recorder, agent_config, jetfleet

T = Topics()
DEV = "cam-1"
# MQTT strings are UTF-8 without U+0000 (Mosquitto drops a client that sends control characters).
mqtt_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=10)


@dataclass
class Rig:
    broker: Broker
    agent: AgentProcess
    op: FleetClient
    health: Recorder
    replies: dict[str, list[tuple[bytes, bytes | None]]]
    lock: threading.Lock

    def frames(self) -> int:
        hs = self.health.json("/health")
        return int(hs[-1]["cameras"][0]["frames_total"]) if hs else 0

    def wait_more_frames(self, than: int, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = self.frames()
            if n > than + 5:
                return n
            time.sleep(0.1)
        raise AssertionError(f"the agent stopped serving frames (still {self.frames()})")

    def send(self, payload: bytes, reply_to: str | None, correlation: bytes | None = None,
             extra: dict[str, Any] | None = None) -> None:
        """Any MQTT 5 properties: through the recorder's raw paho client (jetfleet's sets only its own)."""
        props = Properties(PacketTypes.PUBLISH)
        if reply_to is not None:
            props.ResponseTopic = reply_to
        if correlation is not None:
            props.CorrelationData = correlation
        for k, v in (extra or {}).items():
            setattr(props, k, v)
        self.health.client.publish(T.cmd(DEV), payload, qos=1, properties=props).wait_for_publish(5)

    def reply(self, topic: str, timeout: float = 10.0) -> tuple[dict[str, Any], bytes | None]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                got = self.replies.get(topic)
                if got:
                    body, corr = got[0]
                    return json.loads(body), corr
            time.sleep(0.01)
        raise AssertionError(f"no reply on {topic}")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, color_model: Path) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("cmd")
    video = write_video(tmp / "loop.avi", color_frames(30))
    with Broker(tmp / "broker") as b:
        cfg = agent_config(tmp / "agent", broker=b.url, model=color_model, video=video, device_id=DEV,
                           interval_s=0.3, fleet={"username": "cam-1", "password": "s3cret-pw"})
        agent = AgentProcess(cfg).start()
        health = Recorder(b.port, [T.health(DEV)], client_id="health-rec")
        op = FleetClient(FleetOptions(broker=b.url, client_id="op")).connect()
        replies: dict[str, list[tuple[bytes, bytes | None]]] = {}
        lock = threading.Lock()

        def on_reply(m: Inbound) -> None:
            with lock:
                replies.setdefault(m.topic, []).append((m.payload, m.correlation_data))

        op.subscribe(T.dev(DEV, "cmd/reply/#"), on_reply)
        r = Rig(b, agent, op, health, replies, lock)
        try:
            health.wait_for(lambda: r.frames() > 0, timeout=20, what="the agent's first report")
            yield r
        finally:
            op.close()
            health.close()
            rc = agent.stop()
        assert rc == 0 and "Traceback" not in agent.log(), agent.log()[-3000:]


_topic_ids = itertools.count()


def reply_topic() -> str:
    return T.cmd_reply(DEV, f"t{next(_topic_ids)}")


def test_good_commands(rig: Rig) -> None:
    before = rig.frames()
    with_id = rig.op.command(DEV, "ping")
    assert with_id["ok"] and with_id["result"]["pong"] is True and with_id["result"]["boot"] == 1
    cfg = rig.op.command(DEV, "get-config")
    assert cfg["ok"] and cfg["result"]["device_id"] == DEV
    assert cfg["result"]["fleet"]["password"] == "<redacted>" and "s3cret-pw" not in json.dumps(cfg)
    restart = rig.op.command(DEV, "restart-pipeline", {"camera": "front"})
    assert restart["ok"] and restart["result"]["restarts"] >= 1
    rig.wait_more_frames(before)
    # the reopened source is reported, and the model stayed loaded
    rig.health.wait_for(lambda: rig.health.json("/health")[-1]["cameras"][0]["restarts"] >= 1, what="restarts")
    assert "source reopened on request" in rig.agent.log()


def test_jetfleet_cmd_cli(rig: Rig) -> None:
    ok = jetfleet("--broker", rig.broker.url, "cmd", DEV, "ping")
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    bad = jetfleet("--broker", rig.broker.url, "cmd", DEV, "restart-pipeline", "--args", '{"camera": "back"}')
    assert bad.returncode == 1 and "no camera named 'back'" in json.loads(bad.stdout)["error"]
    nobody = jetfleet("--broker", rig.broker.url, "cmd", "ghost", "ping", "--timeout", "0.5")
    assert nobody.returncode == 2 and "no reply from ghost" in nobody.stderr


@pytest.mark.parametrize("payload, reason", [
    (b"\x00\xffnot json at all", "not valid JSON"),
    (b'{"v": 1, "cmd": "ping"', "not valid JSON"),
    (b'"ping"', "must be a JSON object"),
    (b'{"v": 2, "cmd": "ping"}', "unsupported protocol version 2"),
    (b'{"v": 1, "command": "ping"}', "cmd: must be a string"),
    (b'{"v": 1, "cmd": "ping", "args": "now"}', "args: must be an object"),
    (b'{"v": 1, "cmd": "restart-pipeline", "args": {"camera": 7}}', "args: camera"),
    (b'{"v": 1, "cmd": "format-disk"}', "unknown command 'format-disk'"),
    (encode({"v": 1, "cmd": "ping", "args": {"pad": "x" * (MAX_CMD_BYTES + 10)}}), "byte limit"),
    (b"x" * (4 * MAX_CMD_BYTES), "byte limit"),
], ids=["binary", "truncated", "string", "v2", "no-cmd", "args-string", "camera-int", "unknown", "oversized",
        "oversized-garbage"])
def test_bad_commands_get_an_error_reply(rig: Rig, payload: bytes, reason: str) -> None:
    topic = reply_topic()
    rig.send(payload, topic, correlation=b"corr-1")
    body, corr = rig.reply(topic)
    assert body["v"] == 1 and body["ok"] is False and reason in body["error"], body
    assert corr == b"corr-1"


def test_commands_without_a_response_topic_are_logged_and_harmless(rig: Rig) -> None:
    before = rig.frames()
    for payload in (b"garbage", b'{"v":1,"cmd":"nope"}', b"", b'{"v":1,"cmd":"ping"}'):
        rig.send(payload, None)
    rig.wait_more_frames(before)
    assert rig.op.command(DEV, "ping")["ok"]


def test_a_response_topic_naming_the_devices_own_topics_is_refused(rig: Rig) -> None:
    seen: list[bytes] = []
    rig.op.subscribe(T.state(DEV), lambda m: seen.append(m.payload))
    time.sleep(0.3)
    n = len(seen)  # the retained state
    for own in (T.state(DEV), T.health(DEV), T.cmd(DEV)):
        rig.send(b'{"v":1,"cmd":"ping"}', own, b"c")
    time.sleep(1.0)
    assert all(json.loads(b).get("state") in ("online", "offline", "lost") for b in seen[n:])
    assert rig.agent.log().count("is one of this device's own topics") == 3


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payload=st.one_of(
        st.binary(max_size=300),
        st.dictionaries(st.text(max_size=8), st.one_of(st.none(), st.integers(), st.text(max_size=20)),
                        max_size=4).map(lambda d: json.dumps(d).encode()),
        st.fixed_dictionaries({"v": st.sampled_from([1, 2, "1"]),
                               "cmd": st.sampled_from(["ping", "restart-pipeline", "get-config", "zap", ""]),
                               "args": st.dictionaries(st.sampled_from(["camera", "x", ""]),
                                                       st.one_of(st.text(max_size=10), st.integers()),
                                                       max_size=2)}).map(lambda d: json.dumps(d).encode()),
    ),
    correlation=st.one_of(st.none(), st.binary(max_size=64)),
    user=st.lists(st.tuples(mqtt_text, mqtt_text), max_size=3),
    content_type=st.one_of(st.none(), mqtt_text),
    expiry=st.one_of(st.none(), st.integers(min_value=1, max_value=3600)),
)
def test_anything_on_the_command_topic_gets_one_well_formed_reply(
        rig: Rig, payload: bytes, correlation: bytes | None, user: list[tuple[str, str]],
        content_type: str | None, expiry: int | None) -> None:
    extra: dict[str, Any] = {}
    if user:
        extra["UserProperty"] = user
    if content_type is not None:
        extra["ContentType"] = content_type
    if expiry is not None:
        extra["MessageExpiryInterval"] = expiry
    topic = reply_topic()
    rig.send(payload, topic, correlation, extra)
    body, corr = rig.reply(topic)
    assert body["v"] == 1 and isinstance(body["ok"], bool)
    assert body["ok"] or (isinstance(body["error"], str) and body["error"])
    assert corr == correlation
    with rig.lock:
        assert len(rig.replies[topic]) == 1


def test_agent_still_serving_after_everything(rig: Rig) -> None:
    before = rig.frames()
    rig.wait_more_frames(before)
    assert rig.agent.alive()
    last = rig.health.json("/health")[-1]
    assert last["cameras"][0]["fps"] > 5 and last["cameras"][0]["errors"] == 0
