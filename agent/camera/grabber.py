"""The grabber thread that feeds a camera loop from a source (agent.camera.sources).

The grabber always hands the loop the newest frame and counts the frames the
loop never saw; a lost source reconnects with backoff inside a restart budget.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.camera.sources import FrameReader, SourceSpec, open_reader
from engines.errors import JetagentError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frame:
    seq: int  # grabber's sequence number, 1-based, contiguous over delivered+dropped frames
    image: np.ndarray
    captured: float  # time.monotonic() when read
    prepared: Prepared | None = None  # work done ahead on the grabber thread


@dataclass(frozen=True)
class Prepared:
    """The result of a `Grabber.prepare` hook, tagged with who made it."""

    owner: object  # identifies the function's owner (e.g. the Preprocessor) for reuse checks
    value: Any
    seconds: float


PrepareHook = Callable[[np.ndarray], Prepared]


class Grabber:
    """Reads a source on its own thread.

    mode "latest": the loop always gets the newest frame; frames it never took
    are counted in `dropped` (live cameras, and files paced at their own rate).
    mode "lossless": the reader waits for the loop (files as fast as possible:
    benchmarks, calibration, offline processing).
    """

    def __init__(
        self,
        spec: SourceSpec,
        *,
        mode: str = "latest",
        loop: bool = False,
        paced: bool = False,
        opener: Callable[[SourceSpec], FrameReader] = open_reader,
        backoff: tuple[float, float] = (0.5, 30.0),
        restart_budget: tuple[int, float] = (5, 60.0),
        name: str = "camera",
    ) -> None:
        if mode not in ("latest", "lossless"):
            raise ValueError(f"mode must be latest or lossless, not {mode!r}")
        self.spec = spec
        self.mode = mode
        self.loop = loop
        self.paced = paced
        self.name = name
        self._opener = opener
        self._backoff = backoff
        self._budget_n, self._budget_w = restart_budget
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._taken_seq = 0
        self._seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.state = "starting"
        self.error = ""
        self.reconnects = 0
        self.dropped = 0
        self.read_frames = 0
        self._failures: list[float] = []
        self._gave_up = False
        # Optional work to do on each frame on this thread (the pipeline sets it to the
        # current model's preprocessing); swapped by assignment, read once per frame.
        self.prepare: PrepareHook | None = None

    # -- consumer side ------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"grab-{self.name}", daemon=True)
        self._thread.start()

    def next_frame(self, timeout: float) -> Frame | None:
        """The newest frame not yet taken, waiting up to `timeout`. None if none came."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._frame is None or self._frame.seq <= self._taken_seq:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.finished:
                    return None
                self._cond.wait(remaining)
            frame = self._frame
            self.dropped += frame.seq - self._taken_seq - 1
            self._taken_seq = frame.seq
            self._cond.notify_all()
            return frame

    @property
    def pending(self) -> bool:
        """A frame is waiting that the loop has not taken."""
        with self._cond:
            return self._frame is not None and self._frame.seq > self._taken_seq

    @property
    def finished(self) -> bool:
        """True once the source ended (a file without loop) or the grabber stopped."""
        return self._gave_up or self.state in ("ended", "stopped")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def status(self) -> dict[str, object]:
        return {
            "source": self.spec.text, "kind": self.spec.kind, "state": self.state, "error": self.error,
            "reconnects": self.reconnects, "dropped": self.dropped, "read": self.read_frames,
        }

    # -- reader thread ------------------------------------------------------------------
    def _set_state(self, state: str, error: str = "") -> None:
        if state != self.state:
            log.info("camera %s: %s%s", self.name, state, f" ({error})" if error else "")
        with self._cond:
            self.state, self.error = state, error
            self._cond.notify_all()

    def _publish(self, image: np.ndarray) -> None:
        prepared = None
        hook = self.prepare
        if hook is not None:
            # Runs here, in parallel with the loop's inference of the previous frame.
            # A failure is left for the loop to meet (and report) on its own thread.
            try:
                prepared = hook(image)
            except Exception:
                prepared = None
        with self._cond:
            if self.mode == "lossless":
                while self._frame is not None and self._frame.seq > self._taken_seq and not self._stop.is_set():
                    self._cond.wait(0.5)
            self._seq += 1
            self._frame = Frame(self._seq, image, time.monotonic(), prepared)
            self.read_frames += 1
            self._cond.notify_all()

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                reader = self._opener(self.spec)
            except JetagentError as exc:
                if not self._retry_after_failure(str(exc), attempt):
                    return
                attempt += 1
                continue
            attempt = 0
            self._set_state("streaming")
            outcome = self._pump(reader)
            reader.close()
            if outcome == "stopped":
                break
            if outcome == "ended":
                self._set_state("ended")
                return
            # lost: the source stopped giving frames
            self.reconnects += 1
            if not self._retry_after_failure("source stopped delivering frames", attempt):
                return
            attempt += 1
        self._set_state("stopped")

    def _pump(self, reader: FrameReader) -> str:
        interval = 1.0 / reader.fps if self.paced and reader.fps > 0 else 0.0
        next_due = time.monotonic()
        while not self._stop.is_set():
            image = reader.read()
            if image is None:
                if self.spec.is_live:
                    return "lost"
                if self.loop and reader.rewind():
                    image = reader.read()
                if image is None:
                    return "ended"
            if interval:
                next_due += interval
                delay = next_due - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                else:
                    next_due = time.monotonic()  # fell behind; don't burst to catch up
            self._publish(image)
        return "stopped"

    def _retry_after_failure(self, reason: str, attempt: int) -> bool:
        """Back off before the next try. False when the grabber should give up (stop asked,
        or a file that can't be opened: that will not fix itself)."""
        now = time.monotonic()
        self._failures = [t for t in self._failures if now - t < self._budget_w] + [now]
        if not self.spec.is_live and self.read_frames == 0:
            # A file or directory that cannot be opened will not fix itself.
            self._gave_up = True
            self._set_state("failed", reason)
            return False
        over_budget = len(self._failures) > self._budget_n
        base, cap = self._backoff
        delay = min(cap, base * (2 ** min(attempt, 16)))
        if over_budget:
            delay = cap  # restart budget spent: slow down, keep trying, say so
        delay *= 0.5 + random.random() / 2  # jitter so a fleet doesn't reconnect in lockstep
        self._set_state("failed" if over_budget else "reconnecting", reason)
        self._stop.wait(delay)
        return not self._stop.is_set()
