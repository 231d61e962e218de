"""The deployment state machine: states and allowed transitions, as data, and the one
builder and checker of the deploy-state message.

Every transition is reported (retained) on {p}/dev/{id}/deploy and persisted,
so the fleet and a restarted agent both know where a job stands.
"""

from __future__ import annotations

from typing import Any

from agent.wire.core import VERSION, Fields, decode, now, valid_sha256
from engines.errors import JetagentError

RECEIVED = "received"
DOWNLOADING = "downloading"
VERIFYING = "verifying"
CALIBRATING = "calibrating"
BUILDING = "building"
VALIDATING = "validating"
ACTIVATING = "activating"
PROBATION = "probation"
ACTIVE = "active"
FAILED = "failed"
ROLLED_BACK = "rolled_back"
CANCELLED = "cancelled"

TERMINAL = frozenset({ACTIVE, FAILED, ROLLED_BACK, CANCELLED})

# state -> states it may move to. A job that meets an error anywhere before the
# swap fails and the running model keeps serving; after the swap only probation
# decides, and its failure rolls back.
TRANSITIONS: dict[str, frozenset[str]] = {
    RECEIVED: frozenset({DOWNLOADING, VERIFYING, ACTIVATING, FAILED, CANCELLED}),
    DOWNLOADING: frozenset({VERIFYING, FAILED, CANCELLED}),
    VERIFYING: frozenset({CALIBRATING, BUILDING, ACTIVATING, FAILED, CANCELLED}),
    CALIBRATING: frozenset({BUILDING, VALIDATING, FAILED, CANCELLED}),
    BUILDING: frozenset({VALIDATING, FAILED, CANCELLED}),
    VALIDATING: frozenset({ACTIVATING, FAILED, CANCELLED}),
    ACTIVATING: frozenset({PROBATION, ACTIVE, FAILED}),
    PROBATION: frozenset({ACTIVE, ROLLED_BACK}),
    ACTIVE: frozenset({ROLLED_BACK}),
    FAILED: frozenset(),
    ROLLED_BACK: frozenset(),
    CANCELLED: frozenset(),
}

STATES = tuple(TRANSITIONS)


class TransitionError(JetagentError):
    """A transition the state machine does not allow (a bug in the caller)."""


def check_transition(current: str | None, new: str) -> None:
    if new not in TRANSITIONS:
        raise TransitionError(f"unknown deployment state {new!r}")
    if current is None:
        if new != RECEIVED:
            raise TransitionError(f"a job starts in {RECEIVED!r}, not {new!r}")
        return
    if new not in TRANSITIONS[current]:
        raise TransitionError(f"deployment cannot go from {current!r} to {new!r}")


# -- the deploy-state message (retained on {p}/dev/{id}/deploy) ------------------------------

def deploy_message(job: str, state: str, model: str, **fields: Any) -> dict[str, Any]:
    """A deploy state as the device publishes it (the device adds its `device_id`)."""
    if state not in TRANSITIONS:
        raise TransitionError(f"unknown deployment state {state!r}")
    return {"v": VERSION, "job": job, "state": state, "model": model, "ts": now(), **fields}


def check_deploy(payload: bytes) -> dict[str, Any]:
    """Decode and check a deploy state (the fields jetfleet relies on). Raises ProtocolError."""
    msg = decode(payload, "deploy state")
    f = Fields(msg, "deploy state")
    f.text("job", max_len=128)
    if msg.get("state") not in TRANSITIONS:
        raise f.fail("state", f"must be one of {', '.join(STATES)}")
    model = msg.get("model", "")
    if not isinstance(model, str) or (model and not valid_sha256(model)):
        raise f.fail("model", "must be a sha256 (or empty for a refused desired state)")
    if "progress" in msg:
        f.number("progress", maximum=1.0)
    for key in ("precision", "reason", "device_id"):
        if key in msg and not isinstance(msg[key], str):
            raise f.fail(key, "must be a string")
    return msg
