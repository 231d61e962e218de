"""The content-addressed model store on the device, and resumable downloads into it.

    state_dir/models/<sha256>/model.onnx      verified, fsynced, read-only
    state_dir/models/<sha256>/card.json       the card from the signed manifest
    state_dir/models/<sha256>/manifest.json   the signed envelope it came with
    state_dir/partial/<sha256>/data           a download in progress (preallocated)
    state_dir/partial/<sha256>/bitmap         chunks verified AND fsynced, 1 byte each

Crash safety: chunk bytes are fsynced before the bitmap that claims them is
written (atomically), so after a power cut the bitmap never claims a chunk the
disk does not hold; a resumed download fetches only what the bitmap lacks. A
finished model moves into models/ by rename only after its whole-file sha256
matches; a failed one leaves nothing behind.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from pathlib import Path

from agent.wire.manifest import Manifest
from engines.errors import JetagentError
from engines.fileio import atomic_write_bytes, atomic_write_json, fsync_dir, sha256_file

log = logging.getLogger(__name__)


class StoreError(JetagentError):
    """The store refuses a model (too large, disk full) or a download fails its checks."""


class ChunkRejected(StoreError):
    """One chunk's bytes do not match the manifest; it was discarded, nothing written."""


class ModelStore:
    def __init__(self, root: str | Path, max_model_bytes: int = 2 * 1024**3) -> None:
        self.root = Path(root)
        self.models = self.root / "models"
        self.partial = self.root / "partial"
        self.max_model_bytes = max_model_bytes
        self.models.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(parents=True, exist_ok=True)
        self.clean_staging()

    def model_dir(self, sha256: str) -> Path:
        return self.models / sha256

    def model_path(self, sha256: str) -> Path:
        return self.model_dir(sha256) / "model.onnx"

    def card_path(self, sha256: str) -> Path:
        return self.model_dir(sha256) / "card.json"

    def has(self, sha256: str) -> bool:
        return self.model_path(sha256).is_file() and self.card_path(sha256).is_file()

    def begin(self, manifest: Manifest, envelope: bytes) -> Download:
        """Start or resume the download of `manifest`'s model."""
        if manifest.size > self.max_model_bytes:
            raise StoreError(f"model is {manifest.size} bytes; this device's store takes at most "
                             f"{self.max_model_bytes} bytes per model")
        free = shutil.disk_usage(self.root).free
        d = self.partial / manifest.sha256
        already = (d / "data").stat().st_blocks * 512 if (d / "data").exists() else 0
        if free + already < manifest.size + 16 * 1024 * 1024:
            raise StoreError(f"disk full: {manifest.size} bytes needed, {free} free in {self.root}")
        return Download(self, manifest, envelope)

    def clean_staging(self) -> None:
        """Remove what an interrupted finish() left (called at start-up)."""
        for p in self.models.glob(".*.staging"):
            shutil.rmtree(p, ignore_errors=True)

    def discard(self, sha256: str) -> None:
        """Remove a partial download (after a failure)."""
        shutil.rmtree(self.partial / sha256, ignore_errors=True)

    def remove(self, sha256: str) -> None:
        """Remove a stored model (one that failed validation, or garbage collection)."""
        shutil.rmtree(self.model_dir(sha256), ignore_errors=True)

    def stored(self) -> list[str]:
        return sorted(p.name for p in self.models.iterdir() if (p / "model.onnx").is_file())

    def partials(self) -> list[str]:
        return sorted(p.name for p in self.partial.iterdir() if p.is_dir())

    def gc(self, keep: set[str]) -> list[str]:
        """Remove stored models not in `keep` (the active and rollback slots). Returns what went."""
        gone = [s for s in self.stored() if s not in keep]
        for s in gone:
            self.remove(s)
        return gone


class Download:
    """One model being fetched chunk by chunk. Not thread-safe: one writer."""

    def __init__(self, store: ModelStore, manifest: Manifest, envelope: bytes) -> None:
        self.store = store
        self.manifest = manifest
        self.dir = store.partial / manifest.sha256
        self.dir.mkdir(parents=True, exist_ok=True)
        self._bitmap_path = self.dir / "bitmap"
        self.bitmap = bytearray(manifest.n_chunks)
        data = self.dir / "data"
        try:
            intact = data.stat().st_size == manifest.size
        except FileNotFoundError:
            intact = False
        # A bitmap is only as good as the data file it describes: if that is gone or was
        # never fully allocated (a crash inside finish() or begin()), start over.
        resumed = self._load_bitmap() if intact else 0
        try:
            if not intact:
                self._bitmap_path.unlink(missing_ok=True)
            atomic_write_bytes(self.dir / "manifest.json", envelope)
            self._fd = os.open(str(data), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(_os_reason(exc, f"cannot start the download in {self.dir}")) from exc
        try:
            if os.fstat(self._fd).st_size != manifest.size:
                os.ftruncate(self._fd, manifest.size)
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(self._fd, 0, manifest.size)  # ENOSPC now, not halfway
        except OSError as exc:
            self.close()
            raise StoreError(_os_reason(exc, f"cannot allocate {manifest.size} bytes")) from exc
        self.dirty = 0
        self.rejected = 0
        self.resumed_chunks = resumed
        if resumed:
            log.info("model %s: resuming download, %d of %d chunks already verified",
                     manifest.sha256[:12], resumed, manifest.n_chunks)

    def _load_bitmap(self) -> int:
        try:
            raw = self._bitmap_path.read_bytes()
        except FileNotFoundError:
            return 0
        if len(raw) != len(self.bitmap):
            log.warning("ignoring a bitmap of the wrong length in %s", self.dir)
            return 0
        self.bitmap[:] = raw
        return sum(self.bitmap)

    @property
    def done(self) -> int:
        return sum(self.bitmap)

    @property
    def complete(self) -> bool:
        return all(self.bitmap)

    def missing(self) -> list[int]:
        return [i for i, b in enumerate(self.bitmap) if not b]

    def write_chunk(self, index: int, data: bytes | memoryview) -> bool:
        """Verify and write one chunk. False if it was already held; ChunkRejected if its hash is wrong."""
        m = self.manifest
        if not 0 <= index < m.n_chunks:
            raise ChunkRejected(f"chunk index {index} is outside 0..{m.n_chunks - 1}")
        if self.bitmap[index]:
            return False
        start, end = m.chunk_range(index)
        if len(data) != end - start or hashlib.sha256(data).hexdigest() != m.chunks[index]:
            self.rejected += 1
            raise ChunkRejected(f"chunk {index}: {len(data)} bytes whose sha256 does not match the manifest; "
                                "discarded")
        try:
            os.pwrite(self._fd, data, start)
        except OSError as exc:
            raise StoreError(_os_reason(exc, f"cannot write chunk {index}")) from exc
        self.bitmap[index] = 1
        self.dirty += 1
        return True

    def flush(self) -> None:
        """Make every written chunk durable, then record it in the bitmap."""
        if not self.dirty:
            return
        try:
            os.fsync(self._fd)
            atomic_write_bytes(self._bitmap_path, bytes(self.bitmap))
        except OSError as exc:
            raise StoreError(_os_reason(exc, "cannot persist download progress")) from exc
        self.dirty = 0

    def finish(self) -> Path:
        """Check the whole file and move it into the store. Raises StoreError (and discards) on mismatch."""
        if not self.complete:
            raise StoreError(f"download incomplete: {len(self.missing())} chunks missing")
        self.flush()
        got = sha256_file(self.dir / "data")
        sha = self.manifest.sha256
        if got != sha:
            self.close()
            self.store.discard(sha)
            raise StoreError(f"whole-file sha256 {got[:16]}... does not match the manifest's "
                             f"{sha[:16]}...; download discarded")
        target = self.store.model_dir(sha)
        staging = self.store.models / f".{sha}.staging"
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            # Copy-free: the data file moves into staging; a crash from here on leaves a
            # partial without data, which begin() treats as a fresh download.
            os.replace(self.dir / "data", staging / "model.onnx")
            os.replace(self.dir / "manifest.json", staging / "manifest.json")
            atomic_write_json(staging / "card.json", {**self.manifest.card, "v": 1})
            os.chmod(staging / "model.onnx", 0o444)
            fsync_dir(staging)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            fsync_dir(self.store.models)
        except OSError as exc:
            self.close()
            shutil.rmtree(staging, ignore_errors=True)
            self.store.discard(sha)
            raise StoreError(_os_reason(exc, f"cannot store model {sha[:12]}")) from exc
        self.close()
        self.store.discard(sha)
        return target / "model.onnx"

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _os_reason(exc: OSError, what: str) -> str:
    if exc.errno == errno.ENOSPC:
        return f"disk full: {what}"
    return f"{what}: {exc.strerror or exc}"
