"""Device messages of the wire contract (v1): retained state, health reports, commands and replies.

docs/protocol.md is the human-readable copy; change both together.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from agent.wire.core import VERSION, Fields, ProtocolError, decode, now

# Largest command a device accepts; a bigger one gets an error reply without being parsed.
MAX_CMD_BYTES = 64 * 1024
# What a device says about itself on {p}/dev/{id}/state. "lost" is only ever the broker's
# will message; a device publishes "online" while connected and "offline" when it stops.
DEVICE_STATES = ("online", "offline", "lost")


# -- device state (retained) ----------------------------------------------------------------

def state_message(*, device_id: str, state: str, boot: int, connects: int, agent_version: str,
                  interval_s: float, cameras: list[dict[str, Any]], summary: Mapping[str, Any],
                  ts: float | None = None, groups: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """The retained `{p}/dev/{id}/state` body (also the will, with state "lost")."""
    if state not in DEVICE_STATES:
        raise ValueError(f"state must be one of {DEVICE_STATES}, not {state!r}")
    return {"v": VERSION, "device_id": device_id, "state": state, "boot": boot, "connects": connects,
            "agent_version": agent_version, "interval_s": interval_s, "ts": now() if ts is None else ts,
            "cameras": cameras, "summary": dict(summary), "groups": list(groups)}


def check_state(payload: bytes) -> dict[str, Any]:
    """Decode and check a state message (the fields jetfleet relies on)."""
    msg = decode(payload, "state")
    f = Fields(msg, "state")
    f.ident("device_id")
    if msg.get("state") not in DEVICE_STATES:
        raise f.fail("state", f"must be one of {', '.join(DEVICE_STATES)}")
    f.integer("boot")
    f.number("ts")
    f.obj("summary")
    _camera_list(f)
    return msg


def check_health(payload: bytes) -> dict[str, Any]:
    """Decode and check a health report (the fields jetfleet relies on)."""
    msg = decode(payload, "health")
    f = Fields(msg, "health")
    f.ident("device_id")
    f.integer("seq", minimum=1)
    f.number("ts")
    f.obj("system")
    f.obj("outbox")
    _camera_list(f)
    return msg


def _camera_list(f: Fields) -> None:
    cams = f.msg.get("cameras", [])
    if not isinstance(cams, list) or not all(isinstance(c, dict) and isinstance(c.get("camera"), str)
                                             for c in cams):
        raise f.fail("cameras", "must be a list of objects with a 'camera' name")


# -- commands --------------------------------------------------------------------------------

_CMD_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")


def command_request(cmd: str, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"v": VERSION, "cmd": cmd, "args": dict(args or {})}


def parse_command(payload: bytes) -> tuple[str, dict[str, Any]]:
    """A command body -> (name, args). Raises ProtocolError naming what is wrong."""
    if len(payload) > MAX_CMD_BYTES:
        raise ProtocolError(f"command: {len(payload)} bytes is over the {MAX_CMD_BYTES}-byte limit")
    msg = decode(payload, "command")
    f = Fields(msg, "command")
    name = f.text("cmd", max_len=32)
    if not _CMD_NAME.match(name):
        raise f.fail("cmd", "must be a lowercase command name like 'ping' or 'restart-pipeline'")
    extra = sorted(set(msg) - {"v", "cmd", "args"})
    if extra:
        raise f.fail(extra[0], "unknown field")
    return name, f.obj("args")


def command_ok(result: Any) -> dict[str, Any]:
    return {"v": VERSION, "ok": True, "result": result}


def command_error(error: str) -> dict[str, Any]:
    return {"v": VERSION, "ok": False, "error": error}


def check_reply(payload: bytes) -> dict[str, Any]:
    msg = decode(payload, "reply")
    if not isinstance(msg.get("ok"), bool):
        raise ProtocolError("reply: ok: must be true or false")
    if not msg["ok"]:
        Fields(msg, "reply").text("error", max_len=4096)
    return msg
