"""Calibration sets: camera frames preprocessed for one model input, plus a held-out split.

A `CalibrationSet` holds tensors made by `engines.preprocess` (the one preprocessing
function the camera loop uses), so INT8 is calibrated on exactly what inference sees.
The `calibration` part feeds the quantizer or TensorRT's calibrator; the `holdout`
part is never used for calibration and is what the accuracy gate compares FP32 and
INT8 on. Each holdout sample keeps its `FrameTransform`, so detections are compared
in frame pixels, as served.

On disk (`CalibrationStore`) a set is content-addressed and immutable:

    <root>/<spec hash>/<content hash>/set.json, calibration.npy, holdout.npy
    <root>/<spec hash>/latest.json    -> which set is current for that input spec

Every file is written atomically and the content hash is checked on load, so a set
survives restarts and power cuts, and a damaged one is refused, never used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from calibration.errors import CalibrationError
from engines.fileio import atomic_save_npy, atomic_write_json, dumps, fsync_dir, read_json
from engines.modelcard import InputSpec
from engines.postprocess import FrameTransform
from engines.preprocess import Preprocessor

log = logging.getLogger(__name__)

FORMAT = 1
_TRANSFORM_FIELDS = ("frame_width", "frame_height", "scale_x", "scale_y", "pad_x", "pad_y")


def spec_hash(spec: InputSpec) -> str:
    """sha256 of the input spec: sets made for one spec fit every model with that spec."""
    return hashlib.sha256(dumps(spec.to_dict())).hexdigest()


def _transform_row(t: FrameTransform) -> list[float]:
    return [float(getattr(t, f)) for f in _TRANSFORM_FIELDS]


def _transform(row: Sequence[float]) -> FrameTransform:
    return FrameTransform(int(row[0]), int(row[1]), float(row[2]), float(row[3]), float(row[4]), float(row[5]))


@dataclass(frozen=True)
class CalibrationSet:
    """Preprocessed calibration tensors and a held-out validation split for one input spec.

    `calibration` has shape (N, *tensor) and `holdout` (M, *tensor), where `tensor` is
    the batch-of-one shape `preprocess` gives, so `calibration[i]` feeds a model as is.
    `sources` describes where each sample came from (camera, frame number, time), in
    the order calibration then holdout; it is informative and not part of the hash.
    """

    spec: InputSpec
    calibration: np.ndarray
    holdout: np.ndarray
    holdout_transforms: tuple[FrameTransform, ...]
    sources: tuple[Mapping[str, Any], ...] = ()
    created: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        shape = self.spec.tensor_shape()
        for name, array in (("calibration", self.calibration), ("holdout", self.holdout)):
            if array.ndim != 5 or tuple(array.shape[1:]) != shape:
                raise CalibrationError(f"calibration set {name}: shape {list(array.shape)} does not hold "
                                       f"samples of {list(shape)} (the input spec's tensor)")
            if array.dtype != np.dtype(self.spec.dtype):
                raise CalibrationError(f"calibration set {name}: dtype {array.dtype}, spec says {self.spec.dtype}")
        if len(self.holdout_transforms) != self.holdout.shape[0]:
            raise CalibrationError("calibration set: one frame transform per holdout sample is needed")

    @property
    def size(self) -> tuple[int, int]:
        """(calibration samples, holdout samples)."""
        return int(self.calibration.shape[0]), int(self.holdout.shape[0])

    @property
    def spec_hash(self) -> str:
        """sha256 of the input spec the set was made for."""
        return spec_hash(self.spec)

    @property
    def content_hash(self) -> str:
        """sha256 over the spec and every tensor and transform: what engine cache keys use."""
        digest = hashlib.sha256()
        digest.update(f"jetagent-calibration-set/{FORMAT}\n".encode())
        digest.update(dumps(self.spec.to_dict()))
        for array in (self.calibration, self.holdout):
            digest.update(f"{array.dtype.str}{list(array.shape)}\n".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(dumps([_transform_row(t) for t in self.holdout_transforms]))
        return digest.hexdigest()

    def check_spec(self, spec: InputSpec) -> None:
        """Raise CalibrationError unless this set was made for `spec`."""
        if spec.to_dict() != self.spec.to_dict():
            raise CalibrationError(
                f"calibration set was made for input {self.spec.name!r} {self.spec.width}x{self.spec.height} "
                f"{self.spec.layout} {self.spec.color}; the model needs {spec.name!r} {spec.width}x{spec.height} "
                f"{spec.layout} {spec.color} (collect a new set for this model)")

    def calibration_feeds(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """{input name: tensor} for each calibration sample (what ORT's quantizer reads)."""
        n = self.calibration.shape[0] if limit is None else min(limit, self.calibration.shape[0])
        for i in range(n):
            yield {self.spec.name: self.calibration[i]}

    def summary(self) -> dict[str, Any]:
        """JSON-able description for reports (no tensors)."""
        n, m = self.size
        return {"content_sha256": self.content_hash, "spec_sha256": self.spec_hash, "calibration": n,
                "holdout": m, "input": self.spec.to_dict(), "created": round(self.created, 3),
                "bytes": int(self.calibration.nbytes + self.holdout.nbytes)}

    # ---- files --------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write the set into `directory` (created; files atomic)."""
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(directory / "calibration.npy", self.calibration)
        atomic_save_npy(directory / "holdout.npy", self.holdout)
        atomic_write_json(directory / "set.json", {
            "format": FORMAT, "kind": "jetagent.calibration-set", "content_sha256": self.content_hash,
            "input": self.spec.to_dict(), "holdout_transforms": [_transform_row(t) for t in self.holdout_transforms],
            "sources": [dict(s) for s in self.sources], "created": self.created,
            "calibration": self.size[0], "holdout": self.size[1],
        })

    @classmethod
    def load(cls, directory: Path) -> CalibrationSet:
        """Read a set written by `save`; raises CalibrationError if missing, damaged or altered."""
        try:
            meta = read_json(directory / "set.json")
            calibration = np.load(directory / "calibration.npy", allow_pickle=False)
            holdout = np.load(directory / "holdout.npy", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"calibration set {directory}: cannot read: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CalibrationError(f"calibration set {directory}: unknown format {meta.get('format')!r}"
                                   if isinstance(meta, dict) else f"calibration set {directory}: bad set.json")
        spec = _input_spec(meta.get("input"), directory)
        try:
            loaded = cls(spec=spec, calibration=calibration, holdout=holdout,
                         holdout_transforms=tuple(_transform(r) for r in meta["holdout_transforms"]),
                         sources=tuple(meta.get("sources", ())), created=float(meta.get("created", 0.0)))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CalibrationError(f"calibration set {directory}: bad set.json: {exc}") from exc
        if loaded.content_hash != meta.get("content_sha256"):
            raise CalibrationError(f"calibration set {directory}: content does not match its recorded sha256 "
                                   "(damaged or altered); collect a new set")
        return loaded


def _input_spec(raw: Any, where: Path) -> InputSpec:
    if not isinstance(raw, dict):
        raise CalibrationError(f"calibration set {where}: set.json has no input spec")
    try:
        return InputSpec(name=str(raw["name"]), width=int(raw["width"]), height=int(raw["height"]),
                         layout=str(raw["layout"]), color=str(raw["color"]), resize=str(raw["resize"]),
                         scale=float(raw["scale"]), mean=tuple(float(v) for v in raw["mean"]),
                         std=tuple(float(v) for v in raw["std"]), dtype=str(raw["dtype"]),
                         pad_value=int(raw["pad_value"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CalibrationError(f"calibration set {where}: bad input spec: {exc}") from exc


def build_set(spec: InputSpec, calibration_frames: Iterable[np.ndarray], holdout_frames: Iterable[np.ndarray],
              sources: Sequence[Mapping[str, Any]] = ()) -> CalibrationSet:
    """Preprocess BGR frames (as OpenCV gives them) into a set for `spec`."""
    pre = Preprocessor(spec)
    calib = [pre(f)[0] for f in calibration_frames]
    hold = [pre(f) for f in holdout_frames]
    if not calib or not hold:
        raise CalibrationError(f"a calibration set needs frames in both parts; got {len(calib)} calibration "
                               f"and {len(hold)} holdout frames")
    return CalibrationSet(spec=spec, calibration=np.stack(calib), holdout=np.stack([t for t, _ in hold]),
                          holdout_transforms=tuple(tr for _, tr in hold), sources=tuple(sources))


def read_video_frames(path: str | Path, start: int = 0, stop: int | None = None, count: int | None = None,
                      ) -> list[tuple[int, np.ndarray]]:
    """(frame index, BGR frame) pairs from [start, stop) of a video file, evenly spaced when
    `count` is given. The file is read sequentially (seeking is unreliable in many codecs)."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise CalibrationError(f"cannot open video {path}")
    try:
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or 0
        end = stop if stop is not None else (total if total > 0 else 1 << 30)
        wanted: set[int] | None = None
        if count is not None and total > 0:
            end = min(end, total)
            span = max(0, end - start)
            wanted = {start + (i * span) // count for i in range(min(count, span))}
        frames: list[tuple[int, np.ndarray]] = []
        index = 0
        while index < end:
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            if index >= start and (wanted is None or index in wanted):
                frames.append((index, frame))
            index += 1
    finally:
        cap.release()
    if not frames:
        raise CalibrationError(f"video {path} gave no frames in [{start}, {stop})")
    return frames


def set_from_video(spec: InputSpec, video: str | Path, *, calibration: int = 64, holdout: int = 48,
                   split: float = 0.5) -> CalibrationSet:
    """Calibrate on the first `split` of a video and hold out the rest: two parts of the
    footage that share no frames, so the gate measures on frames calibration never saw."""
    cap = cv2.VideoCapture(str(video))
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
    cap.release()
    if total <= 1:
        raise CalibrationError(f"video {video}: cannot tell its frame count (is it a video file?)")
    cut = max(1, min(total - 1, int(total * split)))
    first = read_video_frames(video, 0, cut, calibration)
    second = read_video_frames(video, cut, total, holdout)
    sources = [{"video": str(video), "frame": i, "part": "calibration"} for i, _ in first]
    sources += [{"video": str(video), "frame": i, "part": "holdout"} for i, _ in second]
    return build_set(spec, (f for _, f in first), (f for _, f in second), sources)


class CalibrationStore:
    """Calibration sets on disk under one root (the agent's `<state_dir>/calibration`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _pointer(self, spec: InputSpec) -> Path:
        return self.root / spec_hash(spec)[:16] / "latest.json"

    def save(self, dataset: CalibrationSet) -> Path:
        """Store `dataset` and make it the latest for its input spec. Returns its directory."""
        group = self.root / dataset.spec_hash[:16]
        final = group / dataset.content_hash[:16]
        if not self._intact(final, dataset.content_hash):
            group.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=group, prefix=".incoming-"))
            try:
                dataset.save(tmp)
                if final.exists():  # a damaged leftover of the same content: replace it
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            fsync_dir(group)
        atomic_write_json(self._pointer(dataset.spec), {"set": final.name, "content_sha256": dataset.content_hash,
                                                        "saved": round(time.time(), 3)})
        log.info("calibration set %s saved: %d calibration + %d holdout samples", final, *dataset.size)
        return final

    @staticmethod
    def _intact(directory: Path, content_hash: str) -> bool:
        if not (directory / "set.json").is_file():
            return False
        try:
            return CalibrationSet.load(directory).content_hash == content_hash
        except CalibrationError as exc:
            log.warning("stored calibration set %s is damaged (%s); rewriting it", directory, exc)
            return False

    def latest(self, spec: InputSpec) -> CalibrationSet | None:
        """The newest stored set for `spec`, or None when there is none.

        Raises CalibrationError when the stored set is damaged (then collect a new one)."""
        pointer = self._pointer(spec)
        try:
            record = read_json(pointer)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"{pointer}: unreadable ({exc}); collect a new calibration set") from exc
        name = record.get("set") if isinstance(record, dict) else None
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise CalibrationError(f"{pointer}: does not name a calibration set")
        dataset = CalibrationSet.load(pointer.parent / name)
        dataset.check_spec(spec)
        return dataset
