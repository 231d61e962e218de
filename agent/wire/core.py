"""The wire contract's base (v1): topics, JSON encoding, typed field checks, received messages.

docs/protocol.md is the human-readable copy of this package; change both together.
Every JSON payload carries "v": 1. Chunk payloads are raw bytes. MQTT 5.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engines.errors import JetagentError

VERSION = 1
DEFAULT_PREFIX = "jetagent"
# Largest JSON message either side accepts; chunk payloads are bounded separately.
MAX_JSON_BYTES = 256 * 1024

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


class ProtocolError(JetagentError):
    """A message that is not valid JSON, not v1, or misses/mistypes a field."""


def valid_id(value: str) -> bool:
    """Device ids, group names and camera names: 1-64 of [A-Za-z0-9_.-], no MQTT wildcards."""
    return bool(_ID.match(value))


def valid_sha256(value: str) -> bool:
    return bool(_SHA.match(value))


@dataclass(frozen=True)
class Topics:
    """Topic builders under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def dev(self, device_id: str, leaf: str) -> str:
        return f"{self.prefix}/dev/{device_id}/{leaf}"

    def state(self, device_id: str) -> str:
        return self.dev(device_id, "state")

    def health(self, device_id: str) -> str:
        return self.dev(device_id, "health")

    def drift(self, device_id: str) -> str:
        return self.dev(device_id, "drift")

    def deploy(self, device_id: str) -> str:
        return self.dev(device_id, "deploy")

    def desired(self, device_id: str) -> str:
        return self.dev(device_id, "desired")

    def group_desired(self, group: str) -> str:
        return f"{self.prefix}/group/{group}/desired"

    def cmd(self, device_id: str) -> str:
        return self.dev(device_id, "cmd")

    def cmd_reply(self, device_id: str, requester: str) -> str:
        """Where a device answers commands sent by `requester` (a jetfleet client id).

        Under the device's own tree, so an ACL that lets a device write only below
        `{p}/dev/{id}/` still lets it answer; the device never subscribes here.
        """
        return self.dev(device_id, f"cmd/reply/{requester}")

    def reply(self, device_id: str, what: str) -> str:
        """Where a device receives answers (command replies to jetfleet, chunks from servers)."""
        return self.dev(device_id, f"reply/{what}")

    def manifest(self, sha256: str) -> str:
        return f"{self.prefix}/models/{sha256}/manifest"

    def get(self, sha256: str) -> str:
        return f"{self.prefix}/models/{sha256}/get"

    # subscriptions
    def all_states(self) -> str:
        return f"{self.prefix}/dev/+/state"

    def all_health(self) -> str:
        return f"{self.prefix}/dev/+/health"

    def all_deploy(self) -> str:
        return f"{self.prefix}/dev/+/deploy"

    def all_gets(self, share_group: str | None = "jetfleet") -> str:
        t = f"{self.prefix}/models/+/get"
        return f"$share/{share_group}/{t}" if share_group else t

    def parse_dev(self, topic: str) -> tuple[str, str] | None:
        """'{p}/dev/{id}/{leaf...}' -> (id, leaf), else None."""
        head = f"{self.prefix}/dev/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head):]
        device_id, _, leaf = rest.partition("/")
        return (device_id, leaf) if device_id and leaf else None

    def parse_model(self, topic: str) -> tuple[str, str] | None:
        """'{p}/models/{sha}/{leaf}' -> (sha, leaf), else None."""
        head = f"{self.prefix}/models/"
        if not topic.startswith(head):
            return None
        sha, _, leaf = topic[len(head):].partition("/")
        return (sha, leaf) if valid_sha256(sha) and leaf else None


def encode(msg: Mapping[str, Any]) -> bytes:
    body = dict(msg)
    body.setdefault("v", VERSION)
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def decode(payload: bytes, what: str = "message") -> dict[str, Any]:
    """Parse a JSON payload and check its version. Raises ProtocolError with the reason."""
    if len(payload) > MAX_JSON_BYTES:
        raise ProtocolError(f"{what}: {len(payload)} bytes is over the {MAX_JSON_BYTES}-byte limit")
    try:
        msg = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what}: not valid JSON ({exc})") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"{what}: must be a JSON object")
    v = msg.get("v")
    if v != VERSION:
        raise ProtocolError(f"{what}: unsupported protocol version {v!r} (this side speaks {VERSION})")
    return msg


class Fields:
    """Typed reads from a decoded message; errors name the field."""

    def __init__(self, msg: Mapping[str, Any], what: str) -> None:
        self.msg = msg
        self.what = what

    def fail(self, key: str, msg: str) -> ProtocolError:
        return ProtocolError(f"{self.what}: {key}: {msg}")

    def text(self, key: str, default: str | None = None, *, required: bool = True, max_len: int = 256) -> str:
        v = self.msg.get(key, default)
        if v is None and not required:
            return ""
        if not isinstance(v, str) or (required and not v) or len(v) > max_len:
            raise self.fail(key, f"must be a string of 1-{max_len} characters")
        return v

    def ident(self, key: str) -> str:
        v = self.text(key)
        if not valid_id(v):
            raise self.fail(key, "must be 1-64 of A-Z a-z 0-9 _ . -")
        return v

    def sha256(self, key: str) -> str:
        v = self.text(key)
        if not valid_sha256(v):
            raise self.fail(key, "must be 64 lowercase hex digits")
        return v

    def integer(self, key: str, default: int | None = None, *, minimum: int = 0, maximum: int = 2**53) -> int:
        v = self.msg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= maximum:
            raise self.fail(key, f"must be an integer in {minimum}..{maximum}")
        return v

    def number(self, key: str, default: float | None = None, *, minimum: float = 0.0,
               maximum: float = 1e15) -> float:
        v = self.msg.get(key, default)
        ok = not isinstance(v, bool) and isinstance(v, (int, float))
        # Compare before converting: a huge JSON integer would overflow float().
        if not ok or v != v or not minimum <= v <= maximum:
            raise self.fail(key, f"must be a number in {minimum:g}..{maximum:g}")
        return float(v)

    def obj(self, key: str, *, required: bool = False) -> dict[str, Any]:
        v = self.msg.get(key)
        if v is None and not required:
            return {}
        if not isinstance(v, dict):
            raise self.fail(key, "must be an object")
        return v

    def int_list(self, key: str, *, max_items: int, maximum: int) -> list[int]:
        v = self.msg.get(key)
        if (not isinstance(v, list) or not v or len(v) > max_items
                or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= maximum for x in v)):
            raise self.fail(key, f"must be a list of 1-{max_items} integers in 0..{maximum}")
        return v


def now() -> float:
    return round(time.time(), 3)


@dataclass(frozen=True)
class Inbound:
    """One received MQTT message, as the link hands it to a consumer (no paho types)."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    retained: bool = False
