"""The implicit INT8 calibrator: calibration batches -> device memory -> TensorRT (8.5-10.x).

TensorRT reads every calibration batch with one shape per input: the network's own
shape when it is static, the calibration profile's OPT shape when it is dynamic
(`engines.trt_profiles.calibration_shape`). A batch of any other shape would be read
short or past its end, so each batch is checked against that shape before it is
copied, and a mismatch stops calibration with both shapes named.

TensorRT needs a subclass of its own IInt8EntropyCalibrator2 (or MinMax) class, which
exists only once tensorrt is imported, and this module must import without it. So the
calibrator's behaviour lives here at module level (`CalibrationFeed`) and
`calibrator_class` composes it with the TensorRT base (this class first in the MRO, so
its methods are the overrides). TensorRT calls these methods from C++; an exception
there is only printed, so errors are kept in `error` and checked after the build.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from engines.cuda_mem import DeviceBuffer, DeviceMemory
from engines.fileio import atomic_write_bytes
from engines.trt_api import EngineBuildError, code_path
from engines.trt_logger import compose

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]
Batch = np.ndarray | Mapping[str, np.ndarray]
BatchSource = str | Path | Callable[[], Iterable[Batch]]

CALIBRATORS = ("entropy", "minmax")


def calibration_batches(source: BatchSource, inputs: Mapping[str, Any]) -> Iterator[dict[str, np.ndarray]]:
    """Yield {input name: array} batches from a directory of .npy/.npz files or a callable."""
    single = next(iter(inputs)) if len(inputs) == 1 else None
    if callable(source):
        items: Iterable[Batch] = source()
    else:
        folder = Path(source)
        files = sorted(p for p in folder.glob("*") if p.suffix in (".npy", ".npz")) if folder.is_dir() else []
        if not files:
            raise EngineBuildError(f"{folder}: no .npy or .npz calibration batches")
        items = (_load_batch(p) for p in files)
    for item in items:
        if isinstance(item, np.ndarray):
            if single is None:
                raise EngineBuildError(f"a bare array cannot feed a model with inputs {sorted(inputs)}; "
                                       "give {name: array} batches (.npz)")
            item = {single: item}
        missing = sorted(set(inputs) - set(item))
        if missing:
            raise EngineBuildError(f"calibration batch lacks inputs {missing}")
        yield {name: np.asarray(item[name]) for name in inputs}


def _load_batch(path: Path) -> Batch:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    array: np.ndarray = np.load(path, allow_pickle=False)
    return array


class CalibrationFeed:
    """Behaviour of jetagent's INT8 calibrator (see the module docstring).

    `shapes`: the shape TensorRT reads each input with; `why`: what that shape is, for errors.
    """

    def __init__(self, batches: Iterator[dict[str, np.ndarray]], memory: DeviceMemory,
                 dtypes: Mapping[str, np.dtype[Any]], shapes: Mapping[str, Shape], cache_path: Path | None,
                 max_batches: int | None, why: str = "the network's input shape") -> None:
        super().__init__()  # the TensorRT (pybind11) base must be initialised explicitly
        self._batches, self._memory, self._dtypes = batches, memory, dict(dtypes)
        self._shapes, self._why = dict(shapes), why
        self._cache_path, self._max = cache_path, max_batches
        self._buffers: dict[str, DeviceBuffer] = {}
        self.batches_fed = 0
        self.cache_read = False
        self.error: str | None = None

    def get_batch_size(self) -> int:
        # Explicit-batch networks carry the batch in the input shape: its leading dimension.
        first = next(iter(self._shapes.values()), ())
        return int(first[0]) if first else 1

    def get_batch(self, names: list[str]) -> list[int] | None:
        if self.error is not None or (self._max is not None and self.batches_fed >= self._max):
            return None
        try:
            batch = next(self._batches, None)
            if batch is None:
                return None
            pointers = []
            for name in names:
                array = np.ascontiguousarray(batch[name], dtype=self._dtypes.get(name, np.float32))
                want = self._shapes.get(name)
                if want is not None and array.shape != want:
                    raise EngineBuildError(f"input {name!r} has shape {list(array.shape)}, but TensorRT reads "
                                           f"calibration batches with {self._why} {list(want)}")
                buffer = self._buffers.get(name)
                if buffer is None or buffer.nbytes < array.nbytes:
                    if buffer is not None:
                        self._memory.free(buffer)
                    buffer = self._buffers[name] = self._memory.alloc(array.nbytes)
                self._memory.copy_to_device(buffer, array)
                pointers.append(buffer.ptr)
            self._memory.synchronize()  # TensorRT reads the buffers as soon as we return
            self.batches_fed += 1
            return pointers
        except Exception as exc:
            self.error = f"calibration batch {self.batches_fed + 1}: {exc}"
            logger.error("%s", self.error)
            return None

    def read_calibration_cache(self) -> bytes | None:
        path = self._cache_path
        if path is None or not path.is_file() or path.stat().st_size == 0:
            return None
        self.cache_read = True
        return path.read_bytes()

    def write_calibration_cache(self, cache: Any) -> None:
        if self._cache_path is not None:
            try:
                atomic_write_bytes(self._cache_path, bytes(cache))
            except OSError as exc:
                self.error = f"writing calibration cache {self._cache_path}: {exc}"

    def free(self) -> None:
        for buffer in self._buffers.values():
            self._memory.free(buffer)
        self._buffers.clear()


@code_path("implicit-calibrator")
def calibrator_class(trt: Any, algorithm: str) -> type:
    """CalibrationFeed over TensorRT's entropy (default) or min-max calibrator base."""
    return compose(CalibrationFeed, trt.IInt8MinMaxCalibrator if algorithm == "minmax"
                   else trt.IInt8EntropyCalibrator2)
