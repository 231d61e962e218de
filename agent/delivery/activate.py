"""Putting a new model in front of a camera: check, swap, probation, commit or roll back.

The old runner stays loaded until the new one passes probation, so a rollback
is one more `swap` between two frames, with no load time and no dropped frame.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from agent.wire.desired import Policy
from engines.errors import JetagentError

if TYPE_CHECKING:  # types only: delivery imports without cv2
    from agent.camera.pipeline import CameraPipeline
    from engines.runner import ModelRunner

log = logging.getLogger(__name__)


class ActivationError(JetagentError):
    """The new model failed its check on live frames; nothing was swapped."""


def live_check(pipeline: CameraPipeline, runner: ModelRunner, policy: Policy, wait_s: float = 10.0) -> str:
    """Run the new model on the camera's newest frame. Raises ActivationError; returns what it ran on."""
    deadline = time.monotonic() + wait_s
    while pipeline.last_frame is None and time.monotonic() < deadline:
        time.sleep(0.05)
    frame = pipeline.last_frame
    if frame is not None:
        image, what = frame.image, f"live frame {frame.seq}"
    else:  # the camera is down: the model still gets checked, and the report says on what
        spec = runner.card.input
        image, what = np.zeros((spec.height, spec.width, 3), np.uint8), "a blank frame (camera not delivering)"
    try:
        result = runner.warm_up(image, runs=max(1, policy.check_frames))
    except JetagentError as exc:
        raise ActivationError(f"new model failed on {what}: {exc}") from exc
    if not np.all(np.isfinite(result.scores)) or (result.boxes is not None and not np.all(np.isfinite(result.boxes))):
        raise ActivationError(f"new model gave non-finite outputs on {what}")
    return what


class Probation:
    """Watches one camera after a swap. `check()` returns None (undecided), or a verdict."""

    def __init__(self, pipeline: CameraPipeline, old: ModelRunner, new: ModelRunner, policy: Policy,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pipeline, self.old, self.new, self.policy = pipeline, old, new, policy
        self.clock = clock
        st = pipeline.stats
        self.baseline_fps = st.fps.rate
        self.errors0, self.frames0 = st.errors, st.frames
        self.started = clock()
        self.reason = ""

    @classmethod
    def swap_in(cls, pipeline: CameraPipeline, new: ModelRunner, policy: Policy,
                clock: Callable[[], float] = time.monotonic) -> Probation:
        baseline = pipeline.stats.fps.rate
        old = pipeline.swap(new)
        p = cls(pipeline, old, new, policy, clock)
        p.baseline_fps = baseline
        p.frames0, p.errors0 = pipeline.swapped_at  # counted under the frame lock, at the swap
        return p

    def measured(self) -> dict[str, float]:
        st = self.pipeline.stats
        elapsed = max(self.clock() - self.started, 1e-9)
        return {"seconds": round(elapsed, 2), "frames": st.frames - self.frames0, "errors": st.errors - self.errors0,
                "fps": round((st.frames - self.frames0) / elapsed, 2), "fps_before": round(self.baseline_fps, 2)}

    def check(self) -> str | None:
        """"pass", "fail" (see `reason`) or None while undecided."""
        p, st = self.policy, self.pipeline.stats
        now = self.clock()
        errors = st.errors - self.errors0
        if errors > p.max_errors:
            self.reason = (f"{errors} inference error(s) on probation (max {p.max_errors}); "
                           f"last: {st.last_error}")
            return "fail"
        streaming = self.pipeline.grabber.state == "streaming"
        last = max(st.last_frame_at, self.started)
        if streaming and now - last > p.stall_s:
            self.reason = f"no frame completed for {now - last:.1f} s while the camera streams (stall)"
            return "fail"
        if now - self.started < p.probation_s:
            return None
        m = self.measured()
        floor = max(p.min_fps, p.min_fps_ratio * self.baseline_fps)
        if floor > 0 and m["fps"] < floor:
            why = f"absolute floor {p.min_fps:g}" if floor == p.min_fps else \
                f"{p.min_fps_ratio:.0%} of the {self.baseline_fps:.1f} fps before the swap"
            self.reason = f"served {m['fps']:.1f} fps on probation, below the floor of {floor:.1f} ({why})"
            return "fail"
        return "pass"

    def rollback(self) -> None:
        self.pipeline.swap(self.old)
        self.new.close()
        log.warning("camera %s: rolled back to %s: %s", self.pipeline.name, self.old.card.name, self.reason)

    def commit(self) -> None:
        self.old.close()


@dataclass
class Verdict:
    """How a probation of one or more cameras ended."""

    outcome: str  # "pass", "fail", or "stopped" (shutdown: neither commit nor roll back)
    reasons: list[str] = field(default_factory=list)  # "camera: why", for a failure
    measured: dict[str, dict[str, float]] = field(default_factory=dict)


def watch(probations: list[Probation], *, stopping: Callable[[], bool], rollback_asked: Callable[[], str | None],
          wait: Callable[[float], None]) -> Verdict:
    """Check every camera's probation until all pass, one fails, an operator asks for a
    rollback (`rollback_asked` returns its reason), or the agent stops."""
    verdicts: dict[str, str] = {}
    while len(verdicts) < len(probations):
        if stopping():
            return Verdict("stopped")
        asked = rollback_asked()
        if asked is not None:
            for p in probations:
                p.reason = p.reason or asked
            verdicts = {p.pipeline.name: "fail" for p in probations}
            break
        for p in probations:
            if p.pipeline.name not in verdicts:
                v = p.check()
                if v is not None:
                    verdicts[p.pipeline.name] = v
        if "fail" in verdicts.values():
            break
        wait(0.1)
    measured = {p.pipeline.name: p.measured() for p in probations}
    if "fail" in verdicts.values():
        return Verdict("fail", [f"{p.pipeline.name}: {p.reason}" for p in probations if p.reason], measured)
    return Verdict("pass", [], measured)
