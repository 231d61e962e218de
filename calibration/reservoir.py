"""A frame reservoir fed by the camera loop: bounded, spread over time, no near-duplicates.

Attach a `FrameReservoir` to `CameraPipeline.observers`. What runs on the camera
thread (`__call__`) is constant work and never waits:

1. at most one frame per `min_interval_s` is looked at (a clock read and a compare);
2. a 16x16 thumbnail (area-averaged from a strided view, ~0.1 ms even for 1080p) is
   compared with the last accepted frame's: mean absolute difference below
   `duplicate_threshold` (0..255 scale) means "nothing changed", and the frame is skipped;
3. the frame is offered to a small bounded queue; when the queue is full it is dropped
   and counted, never waited for.

A worker thread (or `process_pending()` in tests) preprocesses accepted frames with the
model's `Preprocessor` and keeps them by reservoir sampling (Algorithm R), so however
long collection runs, the kept samples are a uniform sample of the whole period and
memory stays at `calibration_size + holdout_size` tensors. Accepted frames are dealt to
the two parts in blocks of `block` consecutive frames, one block in `holdout_every` to
the holdout, so holdout frames are not the immediate neighbours of calibration frames.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import cv2
import numpy as np

from calibration.dataset import CalibrationSet
from calibration.errors import CalibrationError
from engines.modelcard import InputSpec
from engines.postprocess import FrameTransform
from engines.preprocess import Preprocessor

log = logging.getLogger(__name__)

THUMB = 16


class FrameLike(Protocol):
    """What the reservoir reads from a camera frame (agent.camera.grabber.Frame has it)."""

    @property
    def image(self) -> np.ndarray: ...

    @property
    def seq(self) -> int: ...


def thumbnail(image: np.ndarray) -> np.ndarray:
    """A 16x16 float32 summary of a frame, cheap enough for the camera thread."""
    h, w = image.shape[:2]
    step = max(1, min(h, w) // (4 * THUMB))
    view = image[::step, ::step]
    small = cv2.resize(view, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    return np.asarray(small, dtype=np.float32)


@dataclass
class ReservoirStats:
    """Counters for reports: where each offered frame went."""

    offered: int = 0
    too_soon: int = 0
    duplicate: int = 0
    busy: int = 0  # queue full: the worker was behind, the frame was dropped
    accepted: int = 0
    failed: int = 0  # preprocessing raised
    kept_calibration: int = 0
    kept_holdout: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Part:
    capacity: int
    tensors: list[np.ndarray] = field(default_factory=list)
    transforms: list[FrameTransform] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)
    seen: int = 0

    def offer(self, rng: random.Random, tensor: np.ndarray, transform: FrameTransform,
              source: dict[str, Any]) -> None:
        self.seen += 1
        if len(self.tensors) < self.capacity:
            self.tensors.append(tensor)
            self.transforms.append(transform)
            self.sources.append(source)
            return
        slot = rng.randrange(self.seen)  # Algorithm R: every frame so far kept with equal chance
        if slot < self.capacity:
            self.tensors[slot], self.transforms[slot], self.sources[slot] = tensor, transform, source

    def ordered(self) -> list[int]:
        return sorted(range(len(self.tensors)), key=lambda i: self.sources[i].get("accepted", 0))


class FrameReservoir:
    """Collects a calibration set from live frames without ever blocking the camera loop."""

    def __init__(self, spec: InputSpec, *, calibration_size: int = 128, holdout_size: int = 48,
                 min_interval_s: float = 0.5, duplicate_threshold: float = 1.5, block: int = 4,
                 holdout_every: int = 4, queue_size: int = 4, camera: str = "",
                 clock: Callable[[], float] = time.monotonic, seed: int = 0) -> None:
        if calibration_size < 1 or holdout_size < 1:
            raise CalibrationError("a reservoir needs room for at least one calibration and one holdout frame")
        if block < 1 or holdout_every < 2:
            raise CalibrationError("block must be >= 1 and holdout_every >= 2")
        self.spec = spec
        self.camera = camera
        self.min_interval_s = min_interval_s
        self.duplicate_threshold = duplicate_threshold
        self.block, self.holdout_every = block, holdout_every
        self.stats = ReservoirStats()
        self._pre = Preprocessor(spec)
        self._clock = clock
        self._rng = random.Random(seed)
        self._queue: queue.Queue[tuple[np.ndarray, dict[str, Any]]] = queue.Queue(maxsize=queue_size)
        self._last_time: float | None = None
        self._last_thumb: np.ndarray | None = None
        self._calibration = _Part(calibration_size)
        self._holdout = _Part(holdout_size)
        self._lock = threading.Lock()  # guards the parts between the worker and snapshot()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- camera thread ------------------------------------------------------------------------
    def __call__(self, frame: FrameLike, result: object = None) -> None:
        """The pipeline observer: constant work, never waits."""
        self.offer(frame.image, {"camera": self.camera, "seq": int(frame.seq)})

    def offer(self, image: np.ndarray, source: Mapping[str, Any] | None = None) -> bool:
        """Consider one BGR frame. True when it was queued for the reservoir."""
        self.stats.offered += 1
        now = self._clock()
        if self._last_time is not None and now - self._last_time < self.min_interval_s:
            self.stats.too_soon += 1
            return False
        thumb = thumbnail(image)
        if self._last_thumb is not None and float(np.abs(thumb - self._last_thumb).mean()) < self.duplicate_threshold:
            self.stats.duplicate += 1
            self._last_time = now  # look again after the interval, not at the very next frame
            return False
        info = {**(source or {}), "t": round(time.time(), 3), "accepted": self.stats.accepted}
        try:
            self._queue.put_nowait((image, info))
        except queue.Full:
            self.stats.busy += 1
            return False
        self._last_time, self._last_thumb = now, thumb
        self.stats.accepted += 1
        return True

    # ---- worker -------------------------------------------------------------------------------
    def process_pending(self) -> int:
        """Preprocess and keep every queued frame. Returns how many were handled."""
        handled = 0
        while True:
            try:
                image, info = self._queue.get_nowait()
            except queue.Empty:
                return handled
            self._keep(image, info)
            handled += 1

    def _keep(self, image: np.ndarray, info: dict[str, Any]) -> None:
        try:
            tensor, transform = self._pre(image)
        except Exception as exc:  # a frame the preprocessing refuses is skipped, not fatal
            self.stats.failed += 1
            log.warning("calibration reservoir: frame skipped: %s", exc)
            return
        to_holdout = (int(info["accepted"]) // self.block) % self.holdout_every == self.holdout_every - 1
        with self._lock:
            part = self._holdout if to_holdout else self._calibration
            part.offer(self._rng, tensor, transform, info)
            self.stats.kept_calibration = len(self._calibration.tensors)
            self.stats.kept_holdout = len(self._holdout.tensors)

    def start(self) -> None:
        """Run the worker on its own thread (the daemon's way; tests call process_pending)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"reservoir-{self.camera}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                image, info = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._keep(image, info)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker after it has kept what is already queued."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.process_pending()

    # ---- results ------------------------------------------------------------------------------
    @property
    def full(self) -> bool:
        """True once both parts hold as many samples as they have room for."""
        with self._lock:
            return (len(self._calibration.tensors) >= self._calibration.capacity
                    and len(self._holdout.tensors) >= self._holdout.capacity)

    def counts(self) -> tuple[int, int]:
        """(calibration samples kept, holdout samples kept)."""
        with self._lock:
            return len(self._calibration.tensors), len(self._holdout.tensors)

    def snapshot(self, min_calibration: int = 1, min_holdout: int = 1) -> CalibrationSet:
        """The kept samples as a CalibrationSet, in capture order. Raises CalibrationError
        when fewer than the minimum were kept (say how many and why frames were skipped)."""
        with self._lock:
            c_idx, h_idx = self._calibration.ordered(), self._holdout.ordered()
            if len(c_idx) < min_calibration or len(h_idx) < min_holdout:
                raise CalibrationError(
                    f"calibration reservoir kept {len(c_idx)} calibration and {len(h_idx)} holdout frames; "
                    f"{min_calibration} and {min_holdout} are needed (frames offered {self.stats.offered}, "
                    f"too soon {self.stats.too_soon}, near-duplicates {self.stats.duplicate}, "
                    f"worker busy {self.stats.busy})")
            calib = np.stack([self._calibration.tensors[i] for i in c_idx])
            hold = np.stack([self._holdout.tensors[i] for i in h_idx])
            transforms = tuple(self._holdout.transforms[i] for i in h_idx)
            sources = tuple({**self._calibration.sources[i], "part": "calibration"} for i in c_idx) + tuple(
                {**self._holdout.sources[i], "part": "holdout"} for i in h_idx)
        return CalibrationSet(spec=self.spec, calibration=calib, holdout=hold, holdout_transforms=transforms,
                              sources=sources)
