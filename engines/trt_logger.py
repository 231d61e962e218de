"""The one TensorRT logger of a process, and TensorRT's plugin library.

TensorRT keeps a single logger pointer per process: the first logger handed to a
Builder, Runtime or parser is the one it uses, and later ones are ignored with a
warning (NVIDIA/TensorRT issues #1475, #1539). The Python binding keeps a logger
alive only as long as the Builder/Runtime it was given to (`py::keep_alive`), and
`init_libnvinfer_plugins` keeps none at all. A logger per backend or per build
therefore means: messages of every later build or engine go to the first logger,
and once the object that held the first one is freed, TensorRT points at freed
memory. So `process_logger(trt)` makes one relay per imported `tensorrt` module,
keeps it for as long as that module lives, and initialises the plugin library with
it (engines with plugin ops such as EfficientNMS_TRT load only after
`init_libnvinfer_plugins` ran in the process, as NVIDIA's samples do before parsing
and deserializing).

The relay forwards everything to Python logging and keeps the last warnings and
errors (a ring: the real error is the last message, not the first). Callers take a
`mark()` before an operation and read `since(mark)` after it for that operation's words.
"""

from __future__ import annotations

import logging
import threading
import types
import weakref
from collections import deque
from typing import Any

logger = logging.getLogger("engines.tensorrt")

KEPT_MESSAGES = 200  # warnings and errors kept per process; reports quote the last few


class LogRelay:
    """TensorRT's log -> Python logging; warnings and errors are also kept, newest last.

    Composed with trt.ILogger by `compose`, because this module must import without tensorrt.
    Thread-safe: TensorRT logs from whichever thread is building or deserializing.
    """

    def __init__(self, warning: int, error: int, keep: int = KEPT_MESSAGES) -> None:
        super().__init__()  # the TensorRT ILogger (pybind11) base must be initialised explicitly
        self._warning, self._error = warning, error
        self._lock = threading.Lock()
        self._kept: deque[tuple[int, str]] = deque(maxlen=keep)
        self._seq = 0

    def log(self, severity: Any, msg: str) -> None:
        level = int(severity)  # INTERNAL_ERROR=0 ... VERBOSE=4
        if level <= self._warning:
            with self._lock:
                self._seq += 1
                self._kept.append((self._seq, str(msg)))
        py_level = (logging.ERROR if level <= self._error else
                    logging.WARNING if level <= self._warning else logging.DEBUG)
        logger.log(py_level, "TensorRT: %s", msg)

    def mark(self) -> int:
        """A position in the log: `since(mark)` returns what came after it."""
        with self._lock:
            return self._seq

    def since(self, mark: int) -> list[str]:
        """Warnings and errors logged after `mark` (the oldest may have left the ring)."""
        with self._lock:
            return [msg for seq, msg in self._kept if seq > mark]

    @property
    def messages(self) -> list[str]:
        """Every kept warning and error, oldest first."""
        return self.since(0)


_COMPOSED: dict[tuple[type, Any], type] = {}


def compose(behaviour: type, base: Any) -> type:
    """A class with `behaviour`'s methods over a TensorRT base class (cached per pair)."""
    key = (behaviour, base)
    if key not in _COMPOSED:
        _COMPOSED[key] = types.new_class(f"Jetagent{base.__name__}", (behaviour, base))
    return _COMPOSED[key]


# One relay per imported tensorrt module (a real process has one; tests make several stand-ins).
_RELAYS: weakref.WeakKeyDictionary[Any, LogRelay] = weakref.WeakKeyDictionary()
_PLUGINS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def process_logger(trt: Any) -> LogRelay:
    """The process's TensorRT logger (created once, never freed), with the plugin library initialised.

    Give this, and only this, to every Builder, Runtime and OnnxParser.
    """
    with _LOCK:
        relay = _RELAYS.get(trt)
        if relay is None:
            relay = compose(LogRelay, trt.ILogger)(int(trt.ILogger.WARNING), int(trt.ILogger.ERROR))
            _RELAYS[trt] = relay
        if trt not in _PLUGINS:
            _PLUGINS[trt] = _init_plugins(trt, relay)
    return relay


def plugins_ready(trt: Any) -> bool:
    """True once `init_libnvinfer_plugins` succeeded in this process (for reports and `jetagent doctor`)."""
    return bool(_PLUGINS.get(trt, False))


def _init_plugins(trt: Any, relay: LogRelay) -> bool:
    try:
        ok = bool(trt.init_libnvinfer_plugins(relay, ""))
    except Exception as exc:  # the binding raises on a broken libnvinfer_plugin install
        logger.warning("TensorRT plugin library could not be initialised (%s): engines with plugin ops "
                       "(EfficientNMS_TRT, ...) will not build or load", exc)
        return False
    if not ok:
        logger.warning("TensorRT's init_libnvinfer_plugins returned false: engines with plugin ops "
                       "(EfficientNMS_TRT, ...) will not build or load")
    return ok
