"""Desired states (v1): what the operator asks a device or a group to run, and the rollout
policy that judges it on probation. jetfleet writes them with `desired_message`; the device
reads them with `Desired.parse`. Retained on {p}/dev/{id}/desired and {p}/group/{g}/desired.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.wire.core import Fields, ProtocolError, now, valid_id


@dataclass(frozen=True)
class Policy:
    """When a model on probation is rolled back. From the desired state's "policy"."""

    probation_s: float = 30.0
    min_fps: float = 0.0  # absolute floor; 0 = none
    min_fps_ratio: float = 0.5  # of the FPS served just before the swap; 0 = none
    max_errors: int = 0  # inference errors tolerated during probation
    stall_s: float = 10.0  # no frame completed while the camera streams
    check_frames: int = 3  # runs on a live frame before the swap

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Desired:
    job: str
    sha256: str
    cameras: tuple[str, ...] = ()  # empty = every camera
    precision: str = ""  # "" = the device's configured precision
    policy: Policy = field(default_factory=Policy)
    source: str = "device"
    issued: float = 0.0  # when the operator issued it: the newest of a device's group states applies

    @classmethod
    def parse(cls, msg: dict[str, Any], source: str = "device") -> Desired:
        f = Fields(msg, "desired")
        pol = Fields(f.obj("policy"), "desired: policy")
        d = Policy()
        policy = Policy(
            probation_s=pol.number("probation_s", d.probation_s, maximum=24 * 3600),
            min_fps=pol.number("min_fps", d.min_fps, maximum=10_000),
            min_fps_ratio=pol.number("min_fps_ratio", d.min_fps_ratio, maximum=1.0),
            max_errors=pol.integer("max_errors", d.max_errors, maximum=10**6),
            stall_s=pol.number("stall_s", d.stall_s, minimum=0.5, maximum=3600),
            check_frames=pol.integer("check_frames", 3, minimum=1, maximum=100),
        )
        cams = msg.get("cameras", [])
        if not isinstance(cams, list) or len(cams) > 64 or not all(isinstance(c, str) and valid_id(c) for c in cams):
            raise ProtocolError("desired: cameras: must be a list of camera names")
        precision = f.text("precision", "", required=False)
        if precision not in ("", "fp32", "fp16", "int8"):
            raise ProtocolError("desired: precision: must be fp32, fp16 or int8")
        issued = msg.get("issued", 0.0)
        if isinstance(issued, bool) or not isinstance(issued, (int, float)) or issued != issued:
            issued = 0.0  # an unordered state still applies; it just never wins over a dated one
        return cls(job=f.text("job", max_len=128), sha256=f.sha256("model"), cameras=tuple(cams),
                   precision=precision, policy=policy, source=source, issued=float(issued))


def desired_message(job: str, sha256: str, *, precision: str = "", policy: dict[str, Any] | None = None,
                    cameras: Sequence[str] = ()) -> dict[str, Any]:
    """A desired state as `Desired.parse` accepts it; `issued` orders group states."""
    msg: dict[str, Any] = {"v": 1, "job": job, "model": sha256, "issued": now()}
    if cameras:
        msg["cameras"] = list(cameras)
    if precision:
        msg["precision"] = precision
    if policy:
        msg["policy"] = dict(policy)
    return msg
