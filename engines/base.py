"""The Backend seam: what every runtime under `engines/` provides.

A backend is opened from a model file with `open_backend(kind, path, options)`.
The registry maps a backend name to a dotted factory path and is resolved only
when that backend is asked for, so importing this module never imports
onnxruntime, tensorrt or pycuda, and a missing runtime is one clear
`BackendUnavailable` at selection time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from engines.errors import BackendUnavailable, JetagentError

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the runtime sees it.

    `shape` holds ints for fixed dimensions and a string (the symbolic name) or
    None for dynamic ones.
    """

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str  # numpy dtype name: "float32", "float16", "uint8", "int64", ...

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) and d > 0 for d in self.shape)


@dataclass(frozen=True)
class BackendOptions:
    """Runtime knobs. Each backend reads the ones that apply to it.

    threads: intra-op threads for CPU runtimes (0 = runtime default).
    providers: ONNX Runtime execution providers in priority order (empty = CPU).
    graph_optimization: "disable" | "basic" | "extended" | "all".
    precision: the precision asked for; the backend reports what it loaded.
    """

    threads: int = 0
    providers: tuple[str, ...] = ()
    graph_optimization: str = "all"
    precision: str = "fp32"
    extra: Mapping[str, object] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """A loaded model ready to run. Not thread-safe: one caller at a time."""

    @property
    def name(self) -> str:
        """Runtime name, e.g. "onnxruntime" or "tensorrt"."""

    @property
    def precision(self) -> str:
        """The precision actually loaded: "fp32", "fp16" or "int8"."""

    @property
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once. Returns every output by name. Raises InferenceError."""

    def describe(self) -> dict[str, object]:
        """Runtime facts for reports: version, providers, device."""

    def close(self) -> None:
        """Release the runtime's resources. Safe to call twice."""


BackendFactory = Callable[[Path, BackendOptions], Backend]

# name -> "module:function". Explicit, so nothing is discovered by accident.
REGISTRY: dict[str, str] = {
    "onnxruntime": "engines.onnxrt:open_onnxruntime",
    "tensorrt": "engines.tensorrt:open_tensorrt",
}


def backend_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def resolve_factory(kind: str) -> BackendFactory:
    """Import the factory for `kind`. Raises BackendUnavailable with the reason."""
    target = REGISTRY.get(kind)
    if target is None:
        raise BackendUnavailable(
            f"unknown backend {kind!r}; choose one of: {', '.join(REGISTRY)}"
        )
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # the runtime itself is missing
        raise BackendUnavailable(f"backend {kind!r} is not usable here: {exc}") from exc
    factory: BackendFactory = getattr(module, func_name)
    return factory


def open_backend(kind: str, model_path: str | Path, options: BackendOptions | None = None) -> Backend:
    """Open `model_path` with the runtime `kind`."""
    opts = options or BackendOptions()
    if opts.precision not in PRECISIONS:
        raise JetagentError(f"unknown precision {opts.precision!r}; choose one of: {', '.join(PRECISIONS)}")
    return resolve_factory(kind)(Path(model_path), opts)
