"""Writes that survive a power cut, for calibration sets, reports and cache entries.

temp file -> fsync -> rename -> fsync the directory: a reader (or a reboot) sees the
old file or the new one, never a mix. The one copy of the pattern: `agent.atomic`
builds on it (imports point agent -> calibration -> engines).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or unlink inside `directory` durable."""
    fd = os.open(str(directory), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` atomically and durably (file mode `mode`)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def dumps(obj: Any) -> bytes:
    """The JSON encoding used for every file calibration writes (sorted keys, so stable)."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """`obj` as sorted, indented JSON, written atomically."""
    atomic_write_bytes(path, dumps(obj))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    """np.save, atomically (no pickles)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def read_json(path: str | Path) -> Any:
    """Parse a JSON file. Raises OSError / ValueError like `json.loads`."""
    with open(path, "rb") as handle:
        return json.loads(handle.read())
