"""QDQ export with ONNX Runtime's static quantizer, with option profiles per target backend.

The quantizer's options are never hard-coded to one layout; a `QuantProfile` names them
and the target picks:

* TensorRT (explicit quantization): QDQ, int8 activations and weights, symmetric, per-channel
  weights, biases left in float (`QuantizeBias=False`). TensorRT rejects nonzero zero-points
  and int32 biases [onnx-tensorrt operators.md; ORT issues 10743, 14229]; `check_tensorrt_qdq`
  verifies the exported file obeys both before it is handed to the builder.
* CPU (ONNX Runtime): QDQ with uint8 asymmetric activations and int8 weights (u8s8), the
  layout ORT's x86 and ARM integer kernels run fastest; `reduce_range` (7-bit weights) is
  an option for x86 CPUs without VNNI, whose u8s8 kernels can saturate.

Calibration methods: "minmax", "entropy", "percentile" (with its percentile). `op_types`
restricts what is quantized (e.g. ("Conv",) for detection heads that mix boxes and scores
in one tensor). Models older than opset 13 are converted first: per-channel QDQ needs
DequantizeLinear's `axis`, which arrived in opset 13.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibration.errors import QuantizationError
from engines.fileio import sha256_file

if TYPE_CHECKING:  # the set's module needs cv2; exporting a QDQ model does not
    from calibration.dataset import CalibrationSet

log = logging.getLogger(__name__)

TARGETS = ("tensorrt", "cpu")
METHODS = ("minmax", "entropy", "percentile")
MIN_OPSET = 13


@dataclass(frozen=True)
class QuantProfile:
    """Every option that shapes a QDQ export. Part of the engine cache key."""

    name: str
    target: str  # "tensorrt" | "cpu"
    activations: str = "u8"  # "u8" | "s8"
    weights: str = "s8"  # "u8" | "s8"
    symmetric_activations: bool = False
    symmetric_weights: bool = True
    per_channel: bool = True
    reduce_range: bool = False
    quantize_bias: bool = True
    method: str = "minmax"
    percentile: float = 99.999
    op_types: tuple[str, ...] = ()  # empty: every op type the quantizer supports
    max_samples: int | None = None  # calibration samples used (None: the whole set)

    def validate(self) -> None:
        """Raise QuantizationError naming the first bad field."""
        if self.target not in TARGETS:
            raise QuantizationError(f"profile {self.name}: target must be one of {TARGETS}, not {self.target!r}")
        if self.method not in METHODS:
            raise QuantizationError(f"profile {self.name}: method must be one of {METHODS}, not {self.method!r}")
        for key in ("activations", "weights"):
            if getattr(self, key) not in ("u8", "s8"):
                raise QuantizationError(f"profile {self.name}: {key} must be u8 or s8")
        if not 50.0 < self.percentile <= 100.0:
            raise QuantizationError(f"profile {self.name}: percentile must be in (50, 100]")
        if self.max_samples is not None and self.max_samples < 1:
            raise QuantizationError(f"profile {self.name}: max_samples must be >= 1")
        if self.target == "tensorrt" and not (
                self.activations == "s8" and self.weights == "s8" and self.symmetric_activations
                and self.symmetric_weights and not self.quantize_bias):
            raise QuantizationError(f"profile {self.name}: TensorRT needs symmetric int8 activations and weights "
                                    "and float biases (it rejects nonzero zero-points and int32 biases)")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["op_types"] = list(self.op_types)
        return data

    def variant(self, **changes: Any) -> QuantProfile:
        """A copy with some options changed (the name should change too)."""
        return replace(self, **changes)


def tensorrt_profile(method: str = "percentile", op_types: tuple[str, ...] = (), percentile: float = 99.999,
                     ) -> QuantProfile:
    """The only layout TensorRT accepts: QDQ, s8s8 symmetric, per-channel, float biases."""
    suffix = ("-conv" if op_types == ("Conv",) else "") + (f"-p{percentile:g}" if method == "percentile" else "")
    return QuantProfile(name=f"trt-s8s8-{method}{suffix}", target="tensorrt", activations="s8", weights="s8",
                        symmetric_activations=True, symmetric_weights=True, per_channel=True,
                        quantize_bias=False, method=method, percentile=percentile, op_types=op_types)


def cpu_profile(method: str = "minmax", *, reduce_range: bool = False, per_channel: bool = True,
                op_types: tuple[str, ...] = (), percentile: float = 99.999, activations: str = "u8",
                ) -> QuantProfile:
    """ONNX Runtime CPU layouts; u8s8 asymmetric activations are the fast one on x86 and ARM."""
    symmetric = activations == "s8"
    parts = [f"cpu-{activations}s8", "pc" if per_channel else "pt", method]
    if method == "percentile":
        parts.append(f"p{percentile:g}")
    if reduce_range:
        parts.append("rr")
    if op_types:
        parts.append("+".join(t.lower() for t in op_types))
    return QuantProfile(name="-".join(parts), target="cpu", activations=activations, weights="s8",
                        symmetric_activations=symmetric, symmetric_weights=True, per_channel=per_channel,
                        reduce_range=reduce_range, quantize_bias=True, method=method, percentile=percentile,
                        op_types=op_types)


@dataclass(frozen=True)
class QdqExport:
    """What `export_qdq` wrote."""

    path: Path
    profile: QuantProfile
    samples: int
    seconds: float
    source_opset: int
    opset: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "profile": self.profile.to_dict(), "samples": self.samples,
                "seconds": round(self.seconds, 2), "source_opset": self.source_opset, "opset": self.opset,
                "sha256": self.sha256}


class _Reader:
    """ORT CalibrationDataReader over a calibration set (duck-typed: get_next/rewind)."""

    def __init__(self, dataset: CalibrationSet, limit: int | None) -> None:
        self._dataset, self._limit = dataset, limit
        self._it: Iterator[dict[str, np.ndarray]] = dataset.calibration_feeds(limit)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._dataset.calibration_feeds(self._limit)


class _ThreadStdout:
    """sys.stdout stand-in: this thread's prints go to the log, every other thread's pass through.

    ORT's histogram calibrators print() progress; on stdout that would corrupt
    `jetagent bench --json` and the results stream, and a plain redirect_stdout
    would also swallow other threads' output."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.thread = threading.get_ident()

    def write(self, text: str) -> int:
        if threading.get_ident() != self.thread:
            return int(self.original.write(text))
        if text.strip():
            log.debug("onnxruntime quantizer: %s", text.strip())
        return len(text)

    def flush(self) -> None:
        self.original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.original, name)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    proxy = _ThreadStdout(sys.stdout)
    sys.stdout = proxy
    try:
        yield
    finally:
        if sys.stdout is proxy:
            sys.stdout = proxy.original


def _default_opset(model: Any) -> int:
    return max((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)




def _ort_options(profile: QuantProfile) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    qtype = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[profile.method]
    extra: dict[str, Any] = {"ActivationSymmetric": profile.symmetric_activations,
                             "WeightSymmetric": profile.symmetric_weights,
                             "QuantizeBias": profile.quantize_bias}
    if profile.method == "percentile":
        extra["CalibPercentile"] = profile.percentile
    return {"quant_format": QuantFormat.QDQ, "activation_type": qtype[profile.activations],
            "weight_type": qtype[profile.weights], "per_channel": profile.per_channel,
            "reduce_range": profile.reduce_range, "calibrate_method": method,
            "op_types_to_quantize": list(profile.op_types) or None, "extra_options": extra}


def export_qdq(model_path: Path, out_path: Path, dataset: CalibrationSet, profile: QuantProfile) -> QdqExport:
    """Quantize `model_path` into a QDQ ONNX at `out_path`, calibrated on `dataset.calibration`.

    Raises QuantizationError when the quantizer fails or (for TensorRT) its output would be
    refused by TensorRT. `out_path` is written only on success.
    """
    import onnx
    from onnx import version_converter

    try:
        from onnxruntime.quantization import quantize_static
    except ImportError as exc:
        raise QuantizationError(f"onnxruntime's quantization tools are not importable: {exc}") from exc
    profile.validate()
    started = time.monotonic()
    try:
        model = onnx.load(str(model_path))
    except Exception as exc:  # onnx raises DecodeError and friends
        raise QuantizationError(f"{model_path}: not a readable ONNX model: {exc}") from exc
    source_opset = _default_opset(model)
    samples = dataset.size[0] if profile.max_samples is None else min(profile.max_samples, dataset.size[0])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jetagent-quant-", dir=out_path.parent) as work:
        source = Path(work) / "source.onnx"
        if source_opset < MIN_OPSET:
            log.info("%s: converting opset %d -> %d before quantizing", model_path.name, source_opset, MIN_OPSET)
            try:
                model = version_converter.convert_version(model, MIN_OPSET)
            except Exception as exc:  # the converter raises plain RuntimeError/ValueError
                raise QuantizationError(f"{model_path}: cannot convert opset {source_opset} to {MIN_OPSET} "
                                        f"(needed for per-channel QDQ): {exc}") from exc
        onnx.save(model, str(source))
        staged = Path(work) / "quantized.onnx"
        try:
            with _quiet_stdout():
                quantize_static(str(source), str(staged), _Reader(dataset, profile.max_samples),
                                **_ort_options(profile))
        except Exception as exc:  # the quantizer raises anything from ValueError to onnxruntime's Fail
            raise QuantizationError(f"quantizing {model_path.name} with {profile.name} failed: "
                                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                                    ) from exc
        if profile.target == "tensorrt":
            problems = check_tensorrt_qdq(staged)
            if problems:
                raise QuantizationError(f"{profile.name}: the QDQ model would be refused by TensorRT: "
                                        + "; ".join(problems[:3]))
        staged.replace(out_path)
    opset = _default_opset(onnx.load(str(out_path), load_external_data=False))
    seconds = time.monotonic() - started
    log.info("quantized %s -> %s with %s on %d samples in %.1f s", model_path.name, out_path.name, profile.name,
             samples, seconds)
    return QdqExport(path=out_path, profile=profile, samples=samples, seconds=seconds, source_opset=source_opset,
                     opset=opset, sha256=sha256_file(out_path))


def check_tensorrt_qdq(path: Path) -> list[str]:
    """What TensorRT's ONNX parser would refuse in a QDQ file: nonzero zero-points, int32
    (quantized) biases, unsigned types. Empty when the file is fine."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits: Mapping[str, Any] = {i.name: i for i in model.graph.initializer}
    problems = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) >= 3 and node.input[2]:
            zp = inits.get(node.input[2])
            if zp is None:
                problems.append(f"{node.name}: zero-point {node.input[2]} is not a constant")
                continue
            values = numpy_helper.to_array(zp)
            if values.dtype == np.uint8:
                problems.append(f"{node.name}: uint8 quantization (TensorRT takes int8 only)")
            elif np.any(values != 0):
                problems.append(f"{node.name}: nonzero zero-point")
        source = inits.get(node.input[0])
        if node.op_type == "DequantizeLinear" and source is not None and source.data_type == onnx.TensorProto.INT32:
            problems.append(f"{node.name}: int32 (quantized) bias")
    return problems
