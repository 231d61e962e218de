"""Camera sources through OpenCV: source strings, frame readers, and probing a source.

A source string names where frames come from:

    clips/vtest.avi          a video file (optionally looping)
    /dev/video0, v4l2://0    a V4L2 device
    rtsp://..., http(s)://   a network stream
    csi://0?width=1920&height=1080&fps=30   a Jetson CSI camera (nvarguscamerasrc)
    gst:<pipeline> ! appsink a raw GStreamer pipeline (needs GStreamer-enabled OpenCV)
    a directory              the images in it, in name order

The thread that reads a source for a camera loop is `agent.camera.grabber.Grabber`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlparse

import cv2
import numpy as np

from engines.errors import JetagentError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


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
