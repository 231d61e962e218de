"""Camera sources through OpenCV, and the grabber thread that feeds a loop.

A source string names where frames come from:

    clips/vtest.avi          a video file (optionally looping)
    /dev/video0, v4l2://0    a V4L2 device
    rtsp://..., http(s)://   a network stream
    csi://0?width=1920&height=1080&fps=30   a Jetson CSI camera (nvarguscamerasrc)
    gst:<pipeline> ! appsink a raw GStreamer pipeline (needs GStreamer-enabled OpenCV)
    a directory              the images in it, in name order

The grabber always hands the loop the newest frame and counts the frames the
loop never saw; a lost source reconnects with backoff inside a restart budget.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlparse

import cv2
import numpy as np

from engines.errors import JetagentError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SOURCE_KINDS = ("file", "v4l2", "stream", "csi", "gstreamer", "directory")


class SourceError(JetagentError):
    """A camera source that cannot be parsed or opened."""


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    target: str  # path, device, URL or pipeline
    text: str  # what the user wrote

    @property
    def is_live(self) -> bool:
        return self.kind in ("v4l2", "stream", "csi", "gstreamer")


def set_opencv_threads(n: int) -> None:
    """OpenCV's internal thread pool size (0 keeps OpenCV's default). Process-wide."""
    if n > 0:
        cv2.setNumThreads(n)


def parse_source(text: str) -> SourceSpec:
    """Classify a source string. Does not touch the device or file."""
    s = text.strip()
    if not s:
        raise SourceError("camera source is empty")
    if s.startswith("gst:"):
        pipeline = s[4:].strip()
        if "appsink" not in pipeline:
            raise SourceError(f"GStreamer source must end in an appsink: {pipeline!r}")
        return SourceSpec("gstreamer", pipeline, s)
    if s.startswith("csi://"):
        return SourceSpec("csi", csi_pipeline(s), s)
    if s.startswith("v4l2://"):
        return SourceSpec("v4l2", s[len("v4l2://"):], s)
    if s.startswith("/dev/video") or s.isdigit():
        return SourceSpec("v4l2", s, s)
    if "://" in s:
        scheme = s.split("://", 1)[0].lower()
        if scheme in ("rtsp", "rtsps", "http", "https", "rtmp", "udp", "tcp"):
            return SourceSpec("stream", s, s)
        raise SourceError(f"unknown source scheme {scheme!r} in {s!r}")
    if os.path.isdir(s):
        return SourceSpec("directory", s, s)
    return SourceSpec("file", s, s)


def csi_pipeline(url: str) -> str:
    """csi://N?width=W&height=H&fps=F -> the nvarguscamerasrc pipeline for OpenCV."""
    parsed = urlparse(url)
    sensor = parsed.netloc or "0"
    if not sensor.isdigit():
        raise SourceError(f"CSI sensor id must be a number: {url!r}")
    q = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    try:
        w, h, fps = int(q.get("width", 1920)), int(q.get("height", 1080)), int(q.get("fps", 30))
        flip = int(q.get("flip", 0))
    except ValueError:
        raise SourceError(f"CSI width/height/fps/flip must be integers: {url!r}") from None
    return (
        f"nvarguscamerasrc sensor-id={sensor} ! "
        f"video/x-raw(memory:NVMM),width={w},height={h},framerate={fps}/1 ! "
        f"nvvidconv flip-method={flip} ! video/x-raw,format=BGRx ! videoconvert ! "
        "video/x-raw,format=BGR ! appsink drop=true max-buffers=1"
    )


class FrameReader(Protocol):
    fps: float  # native rate, 0 when unknown

    def read(self) -> np.ndarray | None: ...

    def rewind(self) -> bool: ...

    def close(self) -> None: ...


class CaptureReader:
    """A cv2.VideoCapture behind the FrameReader interface."""

    def __init__(self, spec: SourceSpec) -> None:
        if spec.kind == "file" and not os.path.isfile(spec.target):
            raise SourceError(f"video file not found: {spec.target}")
        if spec.kind in ("gstreamer", "csi"):
            cap = cv2.VideoCapture(spec.target, cv2.CAP_GSTREAMER)
        elif spec.kind == "v4l2":
            dev: int | str = int(spec.target) if spec.target.isdigit() else spec.target
            cap = cv2.VideoCapture(dev, cv2.CAP_V4L2)
        else:
            cap = cv2.VideoCapture(spec.target)
        if not cap.isOpened():
            cap.release()
            hint = ""
            if spec.kind in ("gstreamer", "csi"):
                hint = " (is this OpenCV built with GStreamer? pip's wheels are not; JetPack's is)"
            raise SourceError(f"cannot open {spec.kind} source {spec.text!r}{hint}")
        self._cap = cap
        self._spec = spec
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and 0 < fps < 1000 else 0.0

    def read(self) -> np.ndarray | None:
        ok, frame = self._cap.read()
        return frame if ok and frame is not None else None

    def rewind(self) -> bool:
        if self._spec.kind != "file":
            return False
        return bool(self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0))

    def close(self) -> None:
        self._cap.release()


class DirectoryReader:
    """Images in a directory, in name order."""

    def __init__(self, spec: SourceSpec, fps: float = 0.0) -> None:
        self._files = sorted(p for p in Path(spec.target).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._files:
            raise SourceError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in directory {spec.target}")
        self._i = 0
        self.fps = fps

    def read(self) -> np.ndarray | None:
        while self._i < len(self._files):
            path = self._files[self._i]
            self._i += 1
            frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if frame is not None:
                return frame
            log.warning("skipping unreadable image %s", path)
        return None

    def rewind(self) -> bool:
        self._i = 0
        return True

    def close(self) -> None:
        self._files = []


def open_reader(spec: SourceSpec) -> FrameReader:
    if spec.kind == "directory":
        return DirectoryReader(spec)
    return CaptureReader(spec)


def probe_source(text: str) -> tuple[SourceSpec, int, int]:
    """Open a source, read one frame, close it: (spec, width, height). For config checks."""
    spec = parse_source(text)
    reader = open_reader(spec)
    try:
        frame = reader.read()
    finally:
        reader.close()
    if frame is None:
        raise SourceError(f"source {text!r} opened but gave no frame (unreadable or empty video?)")
    return spec, frame.shape[1], frame.shape[0]


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
