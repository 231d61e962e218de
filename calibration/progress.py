"""Progress events for calibration, quantization, engine builds and the gate.

The deployment reports them in its deploy state; the CLI logs them. A callback that
raises is logged and ignored: progress reporting never stops a deployment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

STAGES = ("calibration-set", "quantize", "build", "gate", "timing", "select", "cached")


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a deployment. `fraction` is 0..1 of the whole job when known."""

    stage: str
    message: str
    candidate: str | None = None
    fraction: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stage": self.stage, "message": self.message}
        if self.candidate is not None:
            out["candidate"] = self.candidate
        if self.fraction is not None:
            out["fraction"] = round(self.fraction, 3)
        return out


ProgressFn = Callable[[ProgressEvent], None]


def no_progress(event: ProgressEvent) -> None:
    """The default callback: log at debug level."""
    log.debug("%s: %s", event.stage, event.message)


def safe(callback: ProgressFn | None) -> ProgressFn:
    """Wrap a callback so that an exception in it is logged, never raised."""
    if callback is None:
        return no_progress
    target: ProgressFn = callback

    def call(event: ProgressEvent) -> None:
        try:
            target(event)
        except Exception:
            log.exception("progress callback failed on %s (ignored)", event.stage)

    return call
