"""The state and the decisions of `jetfleet rollout` (agent/jetfleet/rollout.py runs it over MQTT).

A failure is a canary whose job failed, rolled back or was cancelled, one that did not
finish within --timeout, or one found unhealthy while watched: inference errors grew by
more than --max-errors, FPS under --min-fps, or not online at the end of its watch.

Every step is written to a JSON state file (atomically) before the next, so a rollout
that was interrupted continues where it was when run again with the same arguments
(the rollout id is derived from them) or with --resume ID; its decisions are never
taken twice (a rollback is sent at most once per canary).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engines.errors import JetagentError
from engines.fileio import atomic_write_json, read_json

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str) -> float:
    """'90', '90s', '5m', '1h30m', '1.5h' -> seconds."""
    m = _DURATION.match(text.strip().lower())
    if not text.strip() or m is None or not any(m.groups()):
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 5m, 1h30m)")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def parse_percent(text: str) -> float:
    v = float(text.strip().removesuffix("%"))
    if not 0 < v <= 100:
        raise ValueError(f"must be more than 0% and at most 100%, not {text}")
    return v


def pick_canaries(members: list[str], percent: float) -> list[str]:
    """The first ceil(percent% of the group), at least one, of the sorted device ids."""
    ordered = sorted(members)
    n = max(1, math.ceil(len(ordered) * percent / 100 - 1e-9))
    return ordered[:n]


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "jetfleet" / "rollouts"


@dataclass(frozen=True)
class Plan:
    """What a rollout was asked to do: the same arguments give the same id."""

    sha256: str
    group: str
    canary_pct: float
    promote_after_s: float
    max_failures: int
    broker: str
    prefix: str
    repo: str
    precision: str = ""
    policy: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 1800.0
    min_fps: float | None = None
    max_errors: int = 0
    expect: int = 0

    @property
    def rollout_id(self) -> str:
        ident = json.dumps([self.broker, self.prefix, self.group, self.sha256, self.canary_pct, self.promote_after_s,
                            self.max_failures])
        return "ro-" + hashlib.sha256(ident.encode()).hexdigest()[:10]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class RolloutStore:
    """One rollout's state file, DIR/<id>.json, written atomically; DIR/<id>.lock keeps a
    second jetfleet from running the same rollout at the same time."""

    def __init__(self, directory: Path, rollout_id: str) -> None:
        self.dir, self.id = directory, rollout_id
        self.path = directory / f"{rollout_id}.json"

    def load(self) -> dict[str, Any] | None:
        try:
            state = read_json(self.path, None)
        except (OSError, ValueError) as exc:
            raise JetagentError(f"cannot read the rollout state {self.path}: {exc}") from None
        if state is not None and (not isinstance(state, dict) or state.get("id") != self.id):
            raise JetagentError(f"{self.path} is not the state of rollout {self.id}")
        return state

    def save(self, state: dict[str, Any]) -> None:
        state["updated"] = round(time.time(), 3)
        atomic_write_json(self.path, state, mode=0o600)

    @contextmanager
    def locked(self) -> Iterator[None]:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / f"{self.id}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as exc:
            raise JetagentError(f"--state-dir {self.dir}: {exc.strerror or exc}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JetagentError(f"rollout {self.id} is being run by another jetfleet right now") from None
            yield
        finally:
            os.close(fd)


def new_state(plan: Plan, name: str, members: list[str], canaries: list[str],
              skipped: dict[str, str]) -> dict[str, Any]:
    created = round(time.time(), 3)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(created))
    return {"v": 1, "id": plan.rollout_id, "created": created, "plan": plan.to_dict(), "name": name,
            "phase": "canary", "members": members, "canaries": canaries, "skipped": skipped,
            "canary_job": f"{plan.rollout_id}-canary-{stamp}", "group_job": f"{plan.rollout_id}-group-{stamp}",
            "canary_started": created, "resumed": 0,
            "canary": {c: {"published": False, "state": "pending", "active_since": None, "errors0": None,
                           "boot0": None, "verdict": None, "reason": ""} for c in canaries},
            "halt": {}, "group_published": False, "cleared": [], "outcome": None}


FAILED = ("failed", "rolled_back", "cancelled")


def judge(rec: dict[str, Any], deploy_state: str, deploy_reason: str, health: dict[str, Any], plan: Plan,
          now: float, started: float) -> bool:
    """Update one canary's record from what it reports; True when its verdict changed.

    `health`: device_state, fps, errors (inference errors since the agent started), boot.
    """
    if rec["verdict"] in ("failed", "unhealthy"):
        return False
    before = dict(rec)
    rec["state"] = deploy_state
    errors, boot = health.get("errors"), health.get("boot")
    if deploy_state in FAILED:
        rec["verdict"], rec["reason"] = "failed", f"{deploy_state}: {deploy_reason or 'no reason given'}"
    elif deploy_state == "active":
        if rec["active_since"] is None:
            rec["active_since"], rec["errors0"], rec["boot0"] = round(now, 3), errors, boot
        elif boot != rec["boot0"] or (errors is not None and rec["errors0"] is None):
            rec["errors0"], rec["boot0"] = errors, boot  # the agent restarted: its counter did too
        grown = (errors - rec["errors0"]) if isinstance(errors, int) and isinstance(rec["errors0"], int) else 0
        fps = health.get("fps")
        if grown > plan.max_errors:
            rec["verdict"], rec["reason"] = "unhealthy", f"{grown} inference errors since it went active"
        elif now - rec["active_since"] >= plan.promote_after_s:
            if health.get("device_state") != "online":
                rec["verdict"], rec["reason"] = "unhealthy", f"device {health.get('device_state')} at the end of " \
                                                             "its watch"
            elif plan.min_fps is not None and not (isinstance(fps, (int, float)) and fps >= plan.min_fps):
                rec["verdict"], rec["reason"] = "unhealthy", f"{fps} fps, under the {plan.min_fps:g} floor"
            else:
                rec["verdict"], rec["reason"] = "ok", f"healthy for {plan.promote_after_s:g} s"
    elif now - started > plan.timeout_s:
        rec["verdict"], rec["reason"] = "failed", f"still {deploy_state} after {plan.timeout_s:g} s"
    return rec != before


def decide(state: dict[str, Any], plan: Plan) -> tuple[str | None, str]:
    """("promote" | "halt" | None, why)."""
    recs = state["canary"]
    failures = {c: r for c, r in recs.items() if r["verdict"] in ("failed", "unhealthy")}
    why = "; ".join(f"{c}: {r['reason']}" for c, r in sorted(failures.items()))
    if len(failures) > plan.max_failures:
        return "halt", f"{len(failures)} canary failure(s), more than --max-failures {plan.max_failures}: {why}"
    if all(r["verdict"] is not None for r in recs.values()):
        if not any(r["verdict"] == "ok" for r in recs.values()):
            return "halt", f"no canary came through healthy: {why}"
        ok = sum(r["verdict"] == "ok" for r in recs.values())
        return "promote", f"{ok} of {len(recs)} canaries healthy" + (f"; tolerated: {why}" if why else "")
    return None, ""
