"""Where per-frame results go: JSON lines on stdout or appended to a file."""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import IO, Any

from engines.errors import JetagentError


class JsonLinesSink:
    """Thread-safe JSON-lines writer shared by every camera; keeps every Nth result."""

    def __init__(self, output: str, every: int = 1, stream: IO[str] | None = None) -> None:
        self._lock = threading.Lock()
        self._every = max(1, every)
        self._counts: dict[str, int] = {}
        self._owned = False
        self.broken = False
        if stream is not None:
            self._out: IO[str] | None = stream
        elif output == "none":
            self._out = None
        elif output == "-":
            self._out = sys.stdout
        else:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
                self._out = open(output, "a", encoding="utf-8", buffering=1)
            except OSError as exc:
                raise JetagentError(f"cannot open results file {output}: {exc.strerror or exc}") from exc
            self._owned = True

    def __call__(self, record: dict[str, Any]) -> None:
        if self._out is None or self.broken:
            return
        cam = str(record.get("camera", ""))
        n = self._counts.get(cam, 0)
        self._counts[cam] = n + 1
        if n % self._every:
            return
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            try:
                self._out.write(line)
                self._out.flush()
            except (BrokenPipeError, ValueError, OSError):
                # A closed pipe (| head) must not stop the cameras; stop writing instead.
                self.broken = True

    def close(self) -> None:
        if self._owned and self._out is not None:
            self._out.close()
