"""ONNX Runtime backend: CPU everywhere, CUDA/TensorRT execution providers where present."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import BackendOptions, TensorSpec
from engines.errors import BackendUnavailable, InferenceError, ModelLoadError

log = logging.getLogger(__name__)

# ONNX Runtime reports element types as strings like "tensor(float)".
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}

_OPT_LEVELS = ("disable", "basic", "extended", "all")


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable(
            f"onnxruntime is not installed ({exc}); pip install onnxruntime"
        ) from exc
    return onnxruntime


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or None) for d in arg.shape)
    return TensorSpec(name=arg.name, shape=shape, dtype=_ORT_TYPES.get(arg.type, arg.type))


class OnnxRuntimeBackend:
    """A model loaded in an `onnxruntime.InferenceSession`."""

    def __init__(self, path: Path, options: BackendOptions) -> None:
        ort = _import_ort()
        if options.graph_optimization not in _OPT_LEVELS:
            raise ModelLoadError(
                f"graph_optimization must be one of {', '.join(_OPT_LEVELS)}, "
                f"not {options.graph_optimization!r}"
            )
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[options.graph_optimization]
        if options.threads > 0:
            so.intra_op_num_threads = options.threads
            so.inter_op_num_threads = 1
        # Fatal only: a failing frame raises InferenceError with the reason, which we report
        # (ORT would also print a multi-line coloured log for every failed frame).
        so.log_severity_level = 4
        available = set(ort.get_available_providers())
        providers = [p for p in options.providers if p in available] or ["CPUExecutionProvider"]
        missing = [p for p in options.providers if p not in available]
        if missing:
            log.warning("execution providers not available here, skipped: %s", ", ".join(missing))
        try:
            self._session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise ModelLoadError(f"onnxruntime cannot load {path}: {_first_line(exc)}") from exc
        self._version = ort.__version__
        self._options = options
        self._path = path
        self._inputs = tuple(_spec(a) for a in self._session.get_inputs())
        self._outputs = tuple(_spec(a) for a in self._session.get_outputs())
        self._output_names = [o.name for o in self._outputs]
        self._precision = _detect_precision(path) if options.precision == "fp32" else options.precision
        self._closed = False

    @property
    def name(self) -> str:
        return "onnxruntime"

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._closed:
            raise InferenceError("backend is closed")
        try:
            values = self._session.run(self._output_names, dict(feeds))
        except Exception as exc:
            raise InferenceError(f"onnxruntime inference failed: {_first_line(exc)}") from exc
        return dict(zip(self._output_names, values))

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "version": self._version,
            "providers": list(self._session.get_providers()) if not self._closed else [],
            "threads": self._options.threads,
            "graph_optimization": self._options.graph_optimization,
            "precision": self._precision,
            "model": str(self._path),
        }

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            del self._session


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _detect_precision(path: Path) -> str:
    """A QDQ model runs integer kernels on ORT; report it as int8, honestly.

    Reads only the graph's op types (not the weights) to decide.
    """
    try:
        import onnx
    except ImportError:
        return "fp32"
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # the session loaded it; a second parser failing is not our concern
        return "fp32"
    ops = {node.op_type for node in model.graph.node}
    if "QuantizeLinear" in ops or "QLinearConv" in ops or "ConvInteger" in ops:
        return "int8"
    if any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer):
        return "fp16"
    return "fp32"


def open_onnxruntime(path: Path, options: BackendOptions) -> OnnxRuntimeBackend:
    """Registry factory for the "onnxruntime" backend."""
    return OnnxRuntimeBackend(path, options)
