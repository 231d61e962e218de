"""Post-processors behind one output contract.

Whatever runtime ran the model, the camera loop, the reports and the accuracy
gate see a `Result`: class ids and scores, and boxes in frame pixels for
detectors. Swapping TensorRT INT8 for ONNX Runtime never touches them.

Kinds (`postprocess.kind`, keys and defaults in engines/cardspec.py): classification,
ssd, yolo (v5/v8 heads, NMS here), yolo_end2end (NMS inside the model: Ultralytics
nms=True, YOLOv10), efficient_nms (TensorRT EfficientNMS-style outputs), raw. Each gives
`groups()` for engines.sanity and `classes()` for the labels check.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from engines.errors import ModelMismatch
from engines.modelcard import ModelCard, ModelCardError


@dataclass(frozen=True)
class FrameTransform:
    """Maps model-input pixel coordinates back to frame pixel coordinates."""

    frame_width: int
    frame_height: int
    scale_x: float
    scale_y: float
    pad_x: float = 0.0
    pad_y: float = 0.0

    def to_frame(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """Boxes (N,4) x1,y1,x2,y2 in model pixels -> frame pixels, clipped to the frame."""
        out = np.empty_like(boxes_xyxy, dtype=np.float32)
        out[:, 0::2] = (boxes_xyxy[:, 0::2] - self.pad_x) / self.scale_x
        out[:, 1::2] = (boxes_xyxy[:, 1::2] - self.pad_y) / self.scale_y
        np.clip(out[:, 0::2], 0, self.frame_width, out=out[:, 0::2])
        np.clip(out[:, 1::2], 0, self.frame_height, out=out[:, 1::2])
        return out


@dataclass(frozen=True)
class Result:
    """The one output contract.

    class_ids (N,) int32 and scores (N,) float32, best first. For detectors,
    boxes (N,4) float32 x1,y1,x2,y2 in frame pixels; None for classifiers.
    """

    class_ids: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.class_ids.shape[0])

    def to_json(self, labels: Sequence[str] = ()) -> list[dict[str, Any]]:
        out = []
        for i in range(len(self)):
            cid = int(self.class_ids[i])
            item: dict[str, Any] = {
                "class_id": cid,
                "label": labels[cid] if 0 <= cid < len(labels) else str(cid),
                "score": round(float(self.scores[i]), 4),
            }
            if self.boxes is not None:
                item["box"] = [round(float(v), 1) for v in self.boxes[i]]
            out.append(item)
        return out


class Postprocessor(Protocol):
    output_names: tuple[str, ...]

    def __call__(self, outputs: Mapping[str, np.ndarray], transform: FrameTransform) -> Result: ...

    def groups(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs as named channel groups for `engines.sanity`: box channels and
        (activated) score channels apart, so neither can hide the other."""

    def classes(self, outputs: Mapping[str, np.ndarray]) -> int | None:
        """How many classes these outputs carry, where the layout says (checked against the labels)."""


def _empty_detections() -> Result:
    return Result(np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros((0, 4), np.float32))


def _activate(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if kind == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return x


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, limit: int) -> np.ndarray:
    """Greedy non-maximum suppression. Returns kept indices, best first."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    keep: list[int] = []
    while order.size and len(keep) < limit:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        union = areas[i] + areas[rest] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray,
                iou_threshold: float, limit: int) -> np.ndarray:
    """Per-class NMS in one pass: boxes of different classes never suppress each other."""
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    span = float(boxes.max() - boxes.min()) + 1.0
    shifted = boxes + (class_ids.astype(np.float32) * span)[:, None]
    return nms(shifted, scores, iou_threshold, limit)


class _Base:
    output_names: tuple[str, ...] = ()

    def __init__(self, card: ModelCard) -> None:
        self.card = card
        self.where = f"model card {card.name!r}: postprocess"

    def opt(self, key: str) -> Any:
        """A postprocess key's value or its default (engines.cardspec); parse_card checked it."""
        return self.card.option(key)

    def groups(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Default: each output the post-processor reads (or every output) is one group."""
        names = self.output_names or tuple(outputs)
        return {n: np.asarray(outputs[n]) for n in names if n in outputs}

    def classes(self, outputs: Mapping[str, np.ndarray]) -> int | None:
        """How many classes these outputs carry (None: the layout does not say)."""
        return None

    def fetch(self, outputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
        try:
            return outputs[name]
        except KeyError:
            raise ModelMismatch(f"{self.where}: model has no output named {name!r}") from None


def load_array(spec: Any, base_dir: Path, where: str) -> np.ndarray:
    """A float32 array named by a card: a .npy file beside the card, or inline
    {"dtype", "shape", "b64"} (how manifests carry it, so a model travels as one message)."""
    if isinstance(spec, dict):
        try:
            raw = base64.b64decode(str(spec["b64"]), validate=True)
            arr = np.frombuffer(raw, dtype=np.dtype(str(spec["dtype"]))).reshape([int(d) for d in spec["shape"]])
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise ModelCardError(f"{where}: bad inline array: {exc}") from exc
        return arr.astype(np.float32)
    path = base_dir / str(spec)
    try:
        return np.load(path).astype(np.float32)
    except (OSError, ValueError) as exc:
        raise ModelCardError(f"{where}: cannot load {path}: {exc}") from exc


def inline_array(arr: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(arr)
    return {"dtype": str(a.dtype), "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


class ClassificationPost(_Base):
    """Top-k over one (1,C) logits/probabilities output."""

    def __init__(self, card: ModelCard) -> None:
        super().__init__(card)
        self.output = str(self.opt("output"))
        self.output_names = (self.output,) if self.output else ()
        self.top_k = int(self.opt("top_k"))
        self.activation = str(self.opt("score_activation"))

    def _probabilities(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        arr = self.fetch(outputs, self.output) if self.output else next(iter(outputs.values()))
        logits = np.asarray(arr, dtype=np.float32).reshape(-1)
        return _activate(logits, self.activation)

    def groups(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"scores": self._probabilities(outputs)}

    def classes(self, outputs: Mapping[str, np.ndarray]) -> int | None:
        return int(self._probabilities(outputs).shape[0])

    def __call__(self, outputs: Mapping[str, np.ndarray], transform: FrameTransform) -> Result:
        probs = self._probabilities(outputs)
        k = min(self.top_k, probs.shape[0])
        idx = np.argpartition(-probs, k - 1)[:k]
        idx = idx[np.argsort(-probs[idx], kind="stable")]
        return Result(idx.astype(np.int32), probs[idx].astype(np.float32))


class SSDPost(_Base):
    """SSD heads (TF Object Detection API box coder): encodings + anchors -> boxes.

    encodings (1,A,[1,]4) as ty,tx,th,tw; anchors (A,4) as ycenter,xcenter,h,w
    normalised; scores (1,A,C[+1]) with an optional background column 0.
    """

    def __init__(self, card: ModelCard) -> None:
        super().__init__(card)
        self.boxes_name = str(self.opt("boxes"))
        self.scores_name = str(self.opt("scores"))
        self.output_names = (self.boxes_name, self.scores_name)
        anchors = load_array(self.opt("anchors"), card.base_dir, f"{self.where}: anchors")
        if anchors.ndim != 2 or anchors.shape[1] != 4:
            raise ModelCardError(f"{self.where}: anchors: expected shape (A,4), got {anchors.shape}")
        self.anchors = anchors
        self.scales = np.asarray(self.opt("box_scales"), dtype=np.float32)
        self.activation = str(self.opt("score_activation"))
        self.background = bool(self.opt("background_class"))
        self.score_threshold = float(self.opt("score_threshold"))
        self.iou_threshold = float(self.opt("iou_threshold"))
        self.max_detections = int(self.opt("max_detections"))
        t = min(max(self.score_threshold, 1e-12), 1 - 1e-7)
        self._logit_threshold = float(np.log(t / (1 - t)))

    def groups(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        enc = np.asarray(self.fetch(outputs, self.boxes_name), dtype=np.float32).reshape(-1, 4)
        logits = np.asarray(self.fetch(outputs, self.scores_name), dtype=np.float32).reshape(enc.shape[0], -1)
        scores = _activate(logits, self.activation)
        return {"box_encodings": enc, "scores": scores[:, 1:] if self.background else scores}

    def classes(self, outputs: Mapping[str, np.ndarray]) -> int | None:
        enc = np.asarray(self.fetch(outputs, self.boxes_name)).reshape(-1, 4)
        columns = int(np.asarray(self.fetch(outputs, self.scores_name)).size // max(enc.shape[0], 1))
        return columns - 1 if self.background else columns

    def __call__(self, outputs: Mapping[str, np.ndarray], transform: FrameTransform) -> Result:
        enc = np.asarray(self.fetch(outputs, self.boxes_name), dtype=np.float32).reshape(-1, 4)
        logits = np.asarray(self.fetch(outputs, self.scores_name), dtype=np.float32)
        logits = logits.reshape(enc.shape[0], -1)
        if enc.shape[0] != self.anchors.shape[0]:
            raise ModelMismatch(
                f"{self.where}: model gives {enc.shape[0]} boxes but the card has "
                f"{self.anchors.shape[0]} anchors"
            )
        if self.activation == "sigmoid":
            # Threshold in logit space (sigmoid is monotonic): exp() only for the few
            # anchors that pass, not for all ~2k of them every frame.
            if self.background:
                logits = logits[:, 1:]
            anchor_idx, class_ids = np.nonzero(logits >= self._logit_threshold)
            sel_scores = _activate(logits[anchor_idx, class_ids], "sigmoid")
        else:
            scores = _activate(logits, self.activation)
            if self.background:
                scores = scores[:, 1:]
            anchor_idx, class_ids = np.nonzero(scores >= self.score_threshold)
            sel_scores = scores[anchor_idx, class_ids]
        if anchor_idx.size == 0:
            return _empty_detections()
        a = self.anchors[anchor_idx]
        t = enc[anchor_idx] / self.scales
        yc = t[:, 0] * a[:, 2] + a[:, 0]
        xc = t[:, 1] * a[:, 3] + a[:, 1]
        h = np.exp(t[:, 2]) * a[:, 2]
        w = np.exp(t[:, 3]) * a[:, 3]
        iw, ih = self.card.input.width, self.card.input.height
        boxes = np.stack([(xc - w / 2) * iw, (yc - h / 2) * ih, (xc + w / 2) * iw, (yc + h / 2) * ih], axis=1)
        keep = batched_nms(boxes, sel_scores, class_ids, self.iou_threshold, self.max_detections)
        # As the TF Object Detection API does: NMS on unclipped boxes, then clip to the
        # frame and drop boxes that end up with no area.
        frame_boxes = transform.to_frame(boxes[keep])
        ok = (frame_boxes[:, 2] > frame_boxes[:, 0]) & (frame_boxes[:, 3] > frame_boxes[:, 1])
        keep = keep[ok]
        return Result(class_ids[keep].astype(np.int32), sel_scores[keep].astype(np.float32), frame_boxes[ok])


class YoloPost(_Base):
    """YOLOv5 (1,N,5+C: cx,cy,w,h,obj,cls...) and YOLOv8 (1,4+C,N) heads, input-pixel boxes."""

    def __init__(self, card: ModelCard) -> None:
        super().__init__(card)
        self.version = str(self.opt("version"))
        self.output = str(self.opt("output"))
        self.output_names = (self.output,)
        self.score_threshold = float(self.opt("score_threshold"))
        self.iou_threshold = float(self.opt("iou_threshold"))
        self.max_detections = int(self.opt("max_detections"))
        self.num_classes = len(card.labels) or None

    def _rows(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The head as (N, 4+C) (v8) or (N, 5+C) (v5), one row per candidate."""
        out = np.asarray(self.fetch(outputs, self.output), dtype=np.float32)
        if out.ndim == 3:
            out = out[0]
        if out.ndim == 2 and self.version == "v8":
            # (4+C, N) -> (N, 4+C); exporters emit it channel-first.
            if self.num_classes is not None and out.shape[0] == 4 + self.num_classes:
                out = out.T
            elif out.shape[0] < out.shape[1]:
                out = out.T
        if out.ndim != 2 or out.shape[1] < (5 if self.version == "v8" else 6):
            shape = list(np.shape(outputs[self.output]))
            raise ModelMismatch(f"{self.where}: output {self.output!r} has shape {shape}; "
                                f"a YOLO{self.version} head is (1, {'4+C, N' if self.version == 'v8' else 'N, 5+C'})")
        return out

    def groups(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._rows(outputs)
        if self.version == "v8":
            g = {"boxes": out[:, :4], "scores": out[:, 4:]}
            cls = out[:, 4:]
        else:
            g = {"boxes": out[:, :4], "objectness": out[:, 4], "class_scores": out[:, 5:]}
            cls = out[:, 5:] * out[:, 4:5]
        scoring = cls.max(axis=1) >= self.score_threshold if cls.size else np.zeros(0, bool)
        g["detected_boxes_xywh"] = out[scoring, :4]
        return g

    def classes(self, outputs: Mapping[str, np.ndarray]) -> int | None:
        return int(self._rows(outputs).shape[1]) - (4 if self.version == "v8" else 5)

    def __call__(self, outputs: Mapping[str, np.ndarray], transform: FrameTransform) -> Result:
        out = self._rows(outputs)
        if self.version == "v8":
            cls = out[:, 4:]
        else:
            cls = out[:, 5:] * out[:, 4:5]
        class_ids = cls.argmax(axis=1)
        scores = cls[np.arange(cls.shape[0]), class_ids]
        m = scores >= self.score_threshold
        if not m.any():
            return _empty_detections()
        xywh, scores, class_ids = out[m, :4], scores[m], class_ids[m]
        boxes = np.empty_like(xywh)
        boxes[:, 0:2] = xywh[:, 0:2] - xywh[:, 2:4] / 2
        boxes[:, 2:4] = xywh[:, 0:2] + xywh[:, 2:4] / 2
        keep = batched_nms(boxes, scores, class_ids, self.iou_threshold, self.max_detections)
        return Result(class_ids[keep].astype(np.int32), scores[keep].astype(np.float32),
                      transform.to_frame(boxes[keep]))


def _xywh(boxes_xyxy: np.ndarray) -> np.ndarray:
    out = np.empty_like(boxes_xyxy)
    out[:, 0:2] = (boxes_xyxy[:, 0:2] + boxes_xyxy[:, 2:4]) / 2
    out[:, 2:4] = boxes_xyxy[:, 2:4] - boxes_xyxy[:, 0:2]
    return out


def _xyxy(boxes_xywh: np.ndarray) -> np.ndarray:
    out = np.empty_like(boxes_xywh)
    out[:, 0:2] = boxes_xywh[:, 0:2] - boxes_xywh[:, 2:4] / 2
    out[:, 2:4] = boxes_xywh[:, 0:2] + boxes_xywh[:, 2:4] / 2
    return out


def _best(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, threshold: float, limit: int,
          transform: FrameTransform) -> Result:
    """Detections already suppressed by the model: threshold, best first, at most `limit`."""
    keep = np.nonzero((scores >= threshold) & (scores > 0))[0]
    keep = keep[np.argsort(-scores[keep], kind="stable")][:limit]
    if keep.size == 0:
        return _empty_detections()
    return Result(class_ids[keep].astype(np.int32), scores[keep].astype(np.float32),
                  transform.to_frame(boxes[keep].astype(np.float32)))


class YoloEnd2EndPost(_Base):
    """Heads with NMS inside the model (Ultralytics nms=True, YOLOv10, YOLO26): (1, K, 6+) rows of
    box, score, class id in input pixels; rows past the last detection are zero."""

    def __init__(self, card: ModelCard) -> None:
        super().__init__(card)
        self.output = str(self.opt("output"))
        self.output_names = (self.output,)
        self.box_format = str(self.opt("box_format"))
        self.score_threshold = float(self.opt("score_threshold"))
        self.max_detections = int(self.opt("max_detections"))

    def _rows(self, outputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(boxes as x1,y1,x2,y2, the rows) for the first image."""
        raw = np.asarray(self.fetch(outputs, self.output))
        out = raw[0] if raw.ndim == 3 else raw
        if out.ndim != 2 or out.shape[1] < 6:
            raise ModelMismatch(f"{self.where}: output {self.output!r} has shape {list(raw.shape)}; "
                                "yolo_end2end reads (1, K, 6+) rows of box, score, class id")
        out = out.astype(np.float32, copy=False)
        boxes = out[:, :4] if self.box_format == "xyxy" else _xyxy(out[:, :4])
        return boxes, out

    def groups(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        boxes, out = self._rows(outputs)
        scoring = out[:, 4] >= max(self.score_threshold, 1e-12)
        return {"boxes": boxes, "detection_scores": out[:, 4], "detected_boxes_xywh": _xywh(boxes[scoring])}

    def __call__(self, outputs: Mapping[str, np.ndarray], transform: FrameTransform) -> Result:
        boxes, out = self._rows(outputs)
        return _best(boxes, out[:, 4], np.rint(out[:, 5]), self.score_threshold, self.max_detections, transform)


class EfficientNMSPost(_Base):
    """TensorRT EfficientNMS-style outputs: num_detections (1,1), boxes (1,K,4) as corners,
    scores (1,K), classes (1,K); only the first num_detections rows are valid."""

    def __init__(self, card: ModelCard) -> None:
        super().__init__(card)
        self.names = {k: str(self.opt(k)) for k in ("num_detections", "boxes", "scores", "classes")}
        self.output_names = tuple(self.names.values())
        self.box_format = str(self.opt("box_format"))
        self.normalized = bool(self.opt("normalized"))
        self.score_threshold = float(self.opt("score_threshold"))
        self.max_detections = int(self.opt("max_detections"))

    def _valid(self, outputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes x1,y1,x2,y2 in input pixels, scores, class ids) of the valid rows."""
        num = np.asarray(self.fetch(outputs, self.names["num_detections"])).reshape(-1)
        raw_boxes = np.asarray(self.fetch(outputs, self.names["boxes"]))
        if raw_boxes.shape[-1:] != (4,) or num.size < 1:
            raise ModelMismatch(f"{self.where}: outputs {self.names['num_detections']!r} {list(num.shape)} and "
                                f"{self.names['boxes']!r} {list(raw_boxes.shape)} are not (1, 1) and (1, K, 4)")
        boxes = raw_boxes.reshape(-1, 4).astype(np.float32)
        scores = np.asarray(self.fetch(outputs, self.names["scores"]), dtype=np.float32).reshape(-1)
        classes = np.asarray(self.fetch(outputs, self.names["classes"])).reshape(-1)
        if not scores.shape[0] == classes.shape[0] == boxes.shape[0]:
            raise ModelMismatch(f"{self.where}: boxes, scores and classes disagree on K "
                                f"({boxes.shape[0]}, {scores.shape[0]}, {classes.shape[0]})")
        n = int(min(max(int(num[0]), 0), boxes.shape[0]))
        boxes, scores, classes = boxes[:n], scores[:n], classes[:n]
        if self.box_format == "yxyx":
            boxes = boxes[:, [1, 0, 3, 2]]
        if self.normalized:
            iw, ih = self.card.input.width, self.card.input.height
            boxes = boxes * np.array([iw, ih, iw, ih], np.float32)
        return boxes, scores, np.rint(classes.astype(np.float32))

    def groups(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        boxes, scores, _ = self._valid(outputs)
        return {"boxes": boxes, "detection_scores": scores, "detected_boxes_xywh": _xywh(boxes)}

    def __call__(self, outputs: Mapping[str, np.ndarray], transform: FrameTransform) -> Result:
        boxes, scores, classes = self._valid(outputs)
        return _best(boxes, scores, classes, self.score_threshold, self.max_detections, transform)


class RawPost(_Base):
    """No decoding: the result is empty; the raw outputs are what the caller keeps."""

    def __call__(self, outputs: Mapping[str, np.ndarray], transform: FrameTransform) -> Result:
        return Result(np.zeros(0, np.int32), np.zeros(0, np.float32))


POSTPROCESSORS: dict[str, Callable[[ModelCard], Postprocessor]] = {
    "classification": ClassificationPost,
    "ssd": SSDPost,
    "yolo": YoloPost,
    "yolo_end2end": YoloEnd2EndPost,
    "efficient_nms": EfficientNMSPost,
    "raw": RawPost,
}


def make_postprocessor(card: ModelCard) -> Postprocessor:
    """The post-processor the card's `postprocess.kind` names (parse_card checked it)."""
    factory = POSTPROCESSORS.get(card.kind)
    if factory is None:  # a card built in code, not parsed
        raise ModelCardError(
            f"model card {card.name!r}: postprocess: kind: must be one of "
            f"{', '.join(POSTPROCESSORS)}, not {card.kind!r}"
        )
    return factory(card)
