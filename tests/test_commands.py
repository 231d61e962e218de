"""The command router and worker, in-process (a fake agent at our own seam)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import parse_config
from agent.uplink.commands import CommandRouter, CommandService, redacted, register_agent_commands
from agent.wire.core import Inbound, encode
from agent.wire.device import MAX_CMD_BYTES
from engines.errors import JetagentError

CONFIG = parse_config({
    "device_id": "cam-1", "state_dir": "/var/lib/jetagent",
    "fleet": {"broker": "mqtt://broker:1883", "username": "cam-1", "password": "hunter2"},
    "cameras": [{"name": "front", "source": "/dev/video0", "model": "/m/a.onnx"}],
})


class FakeAgent:
    config = CONFIG
    started_at = time.time() - 5

    def __init__(self) -> None:
        self.restarted: list[str] = []

    def camera_names(self) -> list[str]:
        return ["front"]

    def restart_camera(self, name: str) -> dict[str, Any]:
        self.restarted.append(name)
        return {"camera": name, "restarts": len(self.restarted)}


def router(agent: FakeAgent | None = None) -> CommandRouter:
    r = CommandRouter()
    register_agent_commands(r, agent or FakeAgent(), boot=7)
    return r


def cmd(name: str, args: Mapping[str, Any] | None = None, **extra: Any) -> bytes:
    return encode({"v": 1, "cmd": name, "args": dict(args or {}), **extra})


def test_ping() -> None:
    name, reply = router().handle(cmd("ping"))
    assert name == "ping" and reply["ok"] is True and reply["v"] == 1
    assert reply["result"]["pong"] is True and reply["result"]["boot"] == 7 and reply["result"]["uptime_s"] >= 5


def test_get_config_redacts_the_password() -> None:
    _, reply = router().handle(cmd("get-config"))
    text = json.dumps(reply)
    assert reply["ok"] and "hunter2" not in text
    fleet = reply["result"]["fleet"]
    assert fleet["password"] == "<redacted>" and fleet["username"] == "cam-1"
    assert reply["result"]["cameras"][0]["model"] == "/m/a.onnx"


def test_redacted_leaves_absent_secrets_alone() -> None:
    assert redacted({"password": None, "token": "x", "a": [Path("/p"), 1]}) == {
        "password": None, "token": "<redacted>", "a": ["/p", 1]}


def test_restart_pipeline() -> None:
    agent = FakeAgent()
    _, reply = router(agent).handle(cmd("restart-pipeline", {"camera": "front"}))
    assert reply == {"v": 1, "ok": True, "result": {"camera": "front", "restarts": 1}} and agent.restarted == ["front"]
    _, reply = router(agent).handle(cmd("restart-pipeline", {"camera": "back"}))
    assert reply["ok"] is False and "no camera named 'back' (cameras: front)" in reply["error"]
    _, reply = router(agent).handle(cmd("restart-pipeline"))
    assert reply["ok"] is False and "camera" in reply["error"]


def test_each_bad_command_gets_its_own_reason() -> None:
    r = router()
    cases = {
        b"\xff\xfe garbage": "not valid JSON",
        b"[1, 2]": "must be a JSON object",
        encode({"v": 2, "cmd": "ping"}): "unsupported protocol version 2",
        json.dumps({"cmd": "ping"}).encode(): "unsupported protocol version None",
        encode({"v": 1}): "cmd: must be a string",
        encode({"v": 1, "cmd": "PING!"}): "lowercase command name",
        encode({"v": 1, "cmd": "ping", "args": [1]}): "args: must be an object",
        encode({"v": 1, "cmd": "ping", "extra": 1}): "extra: unknown field",
        cmd("ping", {"x": 1}): "x: unknown argument for ping",
        cmd("self-destruct"): "unknown command 'self-destruct' (known: get-config, ping, restart-pipeline)",
        cmd("ping", {"pad": "x" * MAX_CMD_BYTES}): f"over the {MAX_CMD_BYTES}-byte limit",
    }
    for payload, reason in cases.items():
        _, reply = r.handle(payload)
        assert reply["ok"] is False and reason in reply["error"], (payload[:40], reply)


def test_a_handler_bug_becomes_an_error_reply() -> None:
    r = CommandRouter()

    def broken(args: Mapping[str, Any]) -> Any:
        raise KeyError("oops")

    def unserialisable(args: Mapping[str, Any]) -> Any:
        return {"x": object()}

    def refuses(args: Mapping[str, Any]) -> Any:
        raise JetagentError("not now")

    r.register("broken", broken)
    r.register("odd", unserialisable)
    r.register("refuses", refuses)
    assert "internal error: KeyError" in r.handle(cmd("broken"))[1]["error"]
    assert "internal error: TypeError" in r.handle(cmd("odd"))[1]["error"]
    assert r.handle(cmd("refuses"))[1] == {"v": 1, "ok": False, "error": "refuses: not now"}


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=256),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"v": st.sampled_from([1, 1, 2, "1", None]),
                           "cmd": st.sampled_from(["ping", "get-config", "restart-pipeline", "nope", 3, ""]),
                           "args": json_values}).map(lambda v: json.dumps(v).encode()),
))
def test_router_answers_anything_with_a_well_formed_reply(payload: bytes) -> None:
    _, reply = router().handle(payload)
    body = json.loads(encode(reply))
    assert body["v"] == 1 and isinstance(body["ok"], bool)
    if body["ok"]:
        assert "result" in body
    else:
        assert isinstance(body["error"], str) and body["error"]


def test_service_replies_on_the_response_topic_with_the_correlation_data() -> None:
    sent: list[tuple[str, bytes, bytes | None]] = []
    svc = CommandService(router(), lambda t, p, c: sent.append((t, p, c)))
    svc.process(Inbound("p/dev/cam-1/cmd", cmd("ping"), "p/dev/cam-1/cmd/reply/op", b"\x01\x02"))
    svc.process(Inbound("p/dev/cam-1/cmd", b"garbage", None, None))  # no response topic: logged only
    assert len(sent) == 1 and sent[0][0] == "p/dev/cam-1/cmd/reply/op" and sent[0][2] == b"\x01\x02"
    assert json.loads(sent[0][1])["ok"] is True
    assert svc.handled == 2 and svc.rejected == 1


def test_service_queue_is_bounded_and_the_worker_survives_a_failing_reply() -> None:
    calls: list[str] = []

    def reply(topic: str, payload: bytes, corr: bytes | None) -> None:
        calls.append(topic)
        if topic == "bad":
            raise JetagentError("cannot publish there")

    svc = CommandService(router(), reply, maxsize=2)
    for topic in ("bad", "good", "dropped"):
        svc.sink(Inbound("t", cmd("ping"), topic))
    assert svc.overflowed == 1
    svc.start()
    deadline = time.monotonic() + 5
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    svc.stop()
    assert calls == ["bad", "good"]
