"""Writes that survive a power cut, and file hashes: the one copy of each, for every layer.

temp file -> fsync -> rename -> fsync the directory: a reader (or a reboot) sees the
old file or the new one, never a mix, and no temp file outlives a failed write. It
lives in the bottom layer so engines, calibration and agent all use this copy
(imports point agent -> calibration -> engines).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

_MISSING: Any = object()
TEMP_SUFFIX = ".tmp"  # every temp file this module makes is ".<name>.<random>.tmp" beside its target


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
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX)
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
    """The JSON encoding of every file we write (sorted keys, so stable and hashable)."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def atomic_write_json(path: str | Path, obj: Any, mode: int = 0o644) -> None:
    """`obj` as sorted, indented JSON, written atomically."""
    atomic_write_bytes(path, dumps(obj), mode)


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    """np.save, atomically (no pickles)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def read_json(path: str | Path, default: Any = _MISSING) -> Any:
    """Parse a JSON file. A missing file raises FileNotFoundError, or returns `default` when
    one is given; unreadable or invalid JSON raises OSError / ValueError."""
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.read())
    except FileNotFoundError:
        if default is _MISSING:
            raise
        return default


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in blocks. Raises OSError."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()
