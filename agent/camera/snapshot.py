"""What one camera is doing, as one value: `CameraSnapshot`, made by `CameraPipeline.snapshot()`.

The daemon's health lines, the fleet's health report and retained state, `status`, change
detection and the systemd watchdog all read it, so the identity of what a camera serves
(camera, model, sha256, backend, precision) is built in one place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelIdentity:
    """Which model a camera serves, and how."""

    camera: str
    model: str
    sha256: str
    backend: str
    precision: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class CameraSnapshot:
    identity: ModelIdentity
    source: dict[str, Any]  # the grabber's status: source, kind, state, error, reconnects, dropped, read
    pending: bool  # the grabber holds a frame the loop has not taken yet
    frames_total: int
    errors: int
    last_error: str
    fps_now: float
    objects: int  # in the newest result
    dropped: int  # frames the loop never took, over every grabber this camera had
    restarts: int  # source reopened on command
    crashes: int  # camera-loop crashes the daemon restarted
    window: dict[str, Any] | None = None  # fps, frames, latency_ms since the previous window

    @property
    def camera(self) -> str:
        return self.identity.camera

    @property
    def state(self) -> str:
        return str(self.source["state"])

    def change_key(self) -> tuple[str, str, str, str]:
        """What a change report is for: the source's state and the model served."""
        # A camera that is still starting is expected to stream: its first frame is not news.
        state = "streaming" if self.state == "starting" else self.state
        return self.identity.camera, state, self.identity.sha256, self.identity.precision

    def report(self) -> dict[str, Any]:
        """One camera of a health report (docs/protocol.md); needs a window."""
        w = self.window or {"fps": 0.0, "frames": 0, "latency_ms": {}}
        return {
            **self.identity.to_dict(), "fps": w["fps"], "frames": w["frames"], "frames_total": self.frames_total,
            "latency_ms": w["latency_ms"], "objects": self.objects, "errors": self.errors,
            "last_error": self.last_error, "state": self.state, "source_error": self.source["error"],
            "dropped": self.dropped, "reconnects": self.source["reconnects"], "restarts": self.restarts,
            "crashes": self.crashes,
        }

    def status(self) -> dict[str, Any]:
        """The camera as `Agent.status()` shows it (no window is taken)."""
        return {**self.identity.to_dict(), "frames": self.frames_total, "errors": self.errors,
                "last_error": self.last_error, "fps_now": self.fps_now, "source": dict(self.source)}
