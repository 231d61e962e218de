"""Writes that survive a power cut (temp file, fsync, rename, fsync the directory).

The implementation lives in `calibration.fileio` (the lower layer); this adds what
the agent's files need on top.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from calibration.fileio import atomic_write_bytes, fsync_dir

__all__ = ["atomic_write_bytes", "atomic_write_json", "fsync_dir", "read_json"]


def atomic_write_json(path: str | Path, obj: Any, mode: int = 0o644) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n", mode)


def read_json(path: str | Path, default: Any = None) -> Any:
    """Read a JSON file written by atomic_write_json; `default` if it does not exist."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return default
