"""Output sanity: is what a model says worth serving at all? One implementation for the
INT8 gate (every candidate, before any metric), the live check before a swap, and
probation after it.

A model's outputs are looked at in *channel groups*, named by its post-processor
(`Postprocessor.groups`): a YOLOv8 head's box channels and its class-score channels are
two groups, an SSD's box encodings and its (activated) scores are two, a classifier's
probabilities one. A whole-tensor number would let the big box channels hide dead
scores (the failure that made this module).

Checks on their own (`frame_findings`, `OutputStats.findings`):

* ``non_finite``: NaN or Inf anywhere in a raw output or a result;
* ``shape`` / ``dtype``: an output that does not have the shape or dtype the model declares;
* ``score_range``: activated scores outside [0, 1];
* ``box_range``: boxes (in input pixels) far outside the input;
* ``constant``: a score group whose every value is the same (within a frame, or over frames);
  not for ``detection_scores``, the scores of a head that did its own NMS (Ultralytics
  nms=True, EfficientNMS): an empty scene gives the same empty list every frame.

Checks against a reference run of the FP32 model on the same frames (`compare`):

* ``collapsed``: a group constant or all zero where the reference's varies;
* ``range_shrunk``: a group whose spread is under a tenth of the reference's.

Every finding carries numbers, so a refusal says what was seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from engines.errors import JetagentError

if TYPE_CHECKING:
    from engines.base import TensorSpec
    from engines.postprocess import Postprocessor, Result

SCORE_TOLERANCE = 1e-3  # activated scores may round a hair outside [0, 1]
BOX_MARGIN = 0.5  # boxes may stick out of the input by half its size before it is absurd
SHRINK_FACTOR = 10.0  # a spread this many times smaller than FP32's is a collapse
CONSTANT_RTOL = 1e-7  # values this close (relative) count as one value: exact ties, not small spreads


@dataclass(frozen=True)
class Finding:
    check: str  # non_finite, shape, dtype, score_range, box_range, constant, collapsed, range_shrunk
    where: str  # an output name or a channel group ("scores", "output0:boxes")
    detail: str  # what was seen, with numbers

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"

    def to_dict(self) -> dict[str, str]:
        return {"check": self.check, "where": self.where, "detail": self.detail}


class SanityError(JetagentError):
    """A model's outputs are not fit to serve; `findings` says why."""

    def __init__(self, what: str, findings: Sequence[Finding]) -> None:
        self.findings = list(findings)
        shown = "; ".join(str(f) for f in self.findings[:4])
        more = f" (+{len(self.findings) - 4} more)" if len(self.findings) > 4 else ""
        super().__init__(f"{what}: {shown}{more}")


def summary(findings: Sequence[Finding], limit: int = 4) -> str:
    """One line for a report: the first few findings."""
    shown = "; ".join(str(f) for f in findings[:limit])
    return shown + (f" (+{len(findings) - limit} more)" if len(findings) > limit else "")


# -- one frame ---------------------------------------------------------------------------------

def raw_findings(outputs: Mapping[str, np.ndarray], specs: Iterable[TensorSpec] = ()) -> list[Finding]:
    """Non-finite values, and shapes/dtypes that differ from what the model declares."""
    found: list[Finding] = []
    declared = {s.name: s for s in specs}
    for name, value in outputs.items():
        arr = np.asarray(value)
        spec = declared.get(name)
        if spec is not None:
            if len(spec.shape) != arr.ndim or any(isinstance(d, int) and d > 0 and d != n
                                                  for d, n in zip(spec.shape, arr.shape)):
                want = [d if isinstance(d, int) and d > 0 else "?" for d in spec.shape]
                found.append(Finding("shape", name, f"shape {list(arr.shape)}, the model declares {want}"))
            if spec.dtype and arr.dtype.name != spec.dtype:
                found.append(Finding("dtype", name, f"dtype {arr.dtype.name}, the model declares {spec.dtype}"))
        if arr.dtype.kind in "fc":
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:
                nan = int(np.count_nonzero(np.isnan(arr)))
                found.append(Finding("non_finite", name, f"{bad} of {arr.size} values are not finite "
                                                         f"({nan} NaN, {bad - nan} Inf)"))
    return found


def group_findings(groups: Mapping[str, np.ndarray], input_size: tuple[int, int] | None = None) -> list[Finding]:
    """Checks on one frame's channel groups: scores in [0, 1] and not all alike, boxes in range."""
    found: list[Finding] = []
    for name, arr in groups.items():
        a = np.asarray(arr, dtype=np.float64)
        if a.size == 0:
            continue
        finite = a[np.isfinite(a)]
        if finite.size < a.size:
            found.append(Finding("non_finite", name, f"{a.size - finite.size} of {a.size} values are not finite"))
        if finite.size == 0:
            continue
        lo, hi = float(finite.min()), float(finite.max())
        if is_score_group(name):
            if lo < -SCORE_TOLERANCE or hi > 1 + SCORE_TOLERANCE:
                found.append(Finding("score_range", name, f"scores span {lo:.4g}..{hi:.4g}, outside [0, 1] "
                                                          "after activation (wrong score_activation?)"))
            if finite.size >= 2 and _constant(lo, hi) and not is_post_nms_group(name):
                found.append(Finding("constant", name, f"all {finite.size} scores are {lo:.4g}"))
        if name.endswith("boxes_xywh") and input_size is not None:
            # Boxes of the candidates that score: centres far outside the input are garbage.
            w, h = input_size
            xy = a.reshape(-1, a.shape[-1])[:, :2]
            far = ~((xy[:, 0] >= -BOX_MARGIN * w) & (xy[:, 0] <= (1 + BOX_MARGIN) * w)
                    & (xy[:, 1] >= -BOX_MARGIN * h) & (xy[:, 1] <= (1 + BOX_MARGIN) * h))
            n = int(np.count_nonzero(far))
            if n:
                found.append(Finding("box_range", name, f"{n} of {far.size} scoring boxes have their centre "
                                                        f"outside the {w}x{h} input by more than {BOX_MARGIN:.0%} "
                                                        "of it"))
    return found


def result_findings(result: Result) -> list[Finding]:
    """The post-processed result: finite scores and boxes, scores in [0, 1]."""
    found: list[Finding] = []
    s = np.asarray(result.scores, dtype=np.float64)
    if s.size:
        if not np.all(np.isfinite(s)):
            found.append(Finding("non_finite", "result.scores", f"{int(np.count_nonzero(~np.isfinite(s)))} "
                                                               f"of {s.size} scores are not finite"))
        elif s.min() < -SCORE_TOLERANCE or s.max() > 1 + SCORE_TOLERANCE:
            found.append(Finding("score_range", "result.scores",
                                 f"scores span {s.min():.4g}..{s.max():.4g}, outside [0, 1]"))
    if result.boxes is not None and result.boxes.size and not np.all(np.isfinite(result.boxes)):
        found.append(Finding("non_finite", "result.boxes", "boxes are not finite"))
    return found


def frame_findings(outputs: Mapping[str, np.ndarray], post: Postprocessor, *,
                   specs: Iterable[TensorSpec] = (), result: Result | None = None,
                   input_size: tuple[int, int] | None = None) -> list[Finding]:
    """Everything that can be said about one frame's outputs on their own."""
    found = raw_findings(outputs, specs)
    if any(f.check in ("non_finite", "shape") for f in found):
        return found  # groups of a broken tensor say nothing more
    try:
        groups = post.groups(outputs)
    except (ValueError, IndexError, KeyError) as exc:
        return [*found, Finding("shape", "outputs", f"the post-processor cannot read them: {exc}")]
    found += group_findings(groups, input_size)
    if result is not None:
        found += result_findings(result)
    return found


# -- over frames -------------------------------------------------------------------------------

@dataclass
class GroupStats:
    """Running numbers of one channel group over frames; constant memory, mergeable."""

    frames: int = 0
    values: int = 0
    non_finite: int = 0
    lo: float = math.inf
    hi: float = -math.inf
    total: float = 0.0
    total_sq: float = 0.0
    zeros: int = 0
    first: bytes | None = None  # the first frame's bytes: a model that ignores its input repeats them
    varies_over_frames: bool = False

    def add(self, arr: np.ndarray) -> None:
        a = np.asarray(arr, dtype=np.float64).ravel()
        self.frames += 1
        finite = a[np.isfinite(a)]
        self.non_finite += a.size - finite.size
        self.values += finite.size
        if finite.size:
            self.lo = min(self.lo, float(finite.min()))
            self.hi = max(self.hi, float(finite.max()))
            self.total += float(finite.sum())
            self.total_sq += float(np.dot(finite, finite))
            self.zeros += int(finite.size - np.count_nonzero(finite))
        raw = np.ascontiguousarray(arr).tobytes()
        if self.first is None:
            self.first = raw
        elif raw != self.first:
            self.varies_over_frames = True

    @property
    def spread(self) -> float:
        return self.hi - self.lo if self.values else 0.0

    @property
    def std(self) -> float:
        if not self.values:
            return 0.0
        mean = self.total / self.values
        return math.sqrt(max(self.total_sq / self.values - mean * mean, 0.0))

    @property
    def constant(self) -> bool:
        return self.values > 0 and _constant(self.lo, self.hi)

    @property
    def all_zero(self) -> bool:
        return self.values > 0 and self.zeros == self.values

    def describe(self) -> str:
        if not self.values:
            return "no finite values"
        return f"{self.lo:.4g}..{self.hi:.4g} (std {self.std:.3g})"


@dataclass
class OutputStats:
    """Channel-group statistics of one model over a run of frames."""

    groups: dict[str, GroupStats] = field(default_factory=dict)

    def add(self, groups: Mapping[str, np.ndarray]) -> None:
        for name, arr in groups.items():
            self.groups.setdefault(name, GroupStats()).add(arr)

    def findings(self) -> list[Finding]:
        """On its own: non-finite values; score groups constant over every frame seen."""
        found = []
        for name, g in self.groups.items():
            if g.non_finite:
                found.append(Finding("non_finite", name, f"{g.non_finite} values over {g.frames} frame(s) "
                                                         "are not finite"))
            if is_score_group(name) and not is_post_nms_group(name) and g.frames >= 2 and not g.varies_over_frames:
                found.append(Finding("constant", name, f"identical on all {g.frames} frames ({g.describe()}): "
                                                       "the model ignores its input"))
        return found


def compare(reference: OutputStats, candidate: OutputStats) -> list[Finding]:
    """A candidate's groups against the FP32 model's on the same frames: collapsed or shrunk."""
    found = []
    for name, ref in reference.groups.items():
        cand = candidate.groups.get(name)
        if cand is None:
            found.append(Finding("collapsed", name, "missing from the candidate's outputs"))
            continue
        if cand.non_finite and not ref.non_finite:
            found.append(Finding("non_finite", name, f"{cand.non_finite} values are not finite "
                                                     "(FP32's are)"))
            continue
        if ref.constant:
            continue  # nothing to lose
        if cand.all_zero:
            found.append(Finding("collapsed", name, f"all zero; FP32 spans {ref.describe()}"))
        elif cand.constant:
            found.append(Finding("collapsed", name, f"constant {cand.lo:.4g}; FP32 spans {ref.describe()}"))
        elif ref.spread > 0 and cand.spread * SHRINK_FACTOR < ref.spread:
            found.append(Finding("range_shrunk", name, f"spans {cand.describe()}, under a tenth of FP32's "
                                                       f"{ref.describe()}"))
    return found


def is_score_group(name: str) -> bool:
    """Groups whose values are activated scores (probabilities)."""
    leaf = name.rsplit(":", 1)[-1]
    return leaf in ("scores", "class_scores", "objectness", "probabilities", "detection_scores")


def is_post_nms_group(name: str) -> bool:
    """Scores of detections a model already suppressed: none at all is a valid answer."""
    return name.rsplit(":", 1)[-1] == "detection_scores"


def _constant(lo: float, hi: float) -> bool:
    return hi - lo <= CONSTANT_RTOL * max(abs(hi), abs(lo))


def as_dicts(findings: Sequence[Finding]) -> list[dict[str, Any]]:
    return [f.to_dict() for f in findings]
