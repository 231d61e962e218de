"""The engine cache: build an engine once per everything that makes it non-portable.

An entry is keyed by a `Fingerprint`: model sha256, backend and its version, device
identity (GPU name, compute capability, L4T release, the board's device-tree model, SM
count, memory and CUDA version, because every Orin module reports "Orin" 8.7; or the
CPU's ISA), precision, calibration-set hash and the build options (for a plan, with the
sha256 of the exact ONNX it was built from: the model or its QDQ export). Each entry is a directory holding the
artifact (a TensorRT plan, or for ONNX Runtime the QDQ ONNX) and, beside it, a sidecar
`<artifact>.cache.json` with the full fingerprint. Metadata never goes inside the
artifact, so any other loader still reads it.

A lookup is a hit only when the sidecar's fingerprint equals the one asked for and the
artifact's sha256 matches the one recorded: a damaged or foreign entry is a miss and
is rebuilt. Entries are written in a temp directory and renamed into place, so a
power cut leaves either no entry or a whole one.

TensorRT timing caches are keyed by backend version and device only (not the model):
they are valid for any network built by the same TensorRT on the same GPU.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.fileio import atomic_write_json, dumps, fsync_dir, read_json, sha256_file

log = logging.getLogger(__name__)

FORMAT = 1
# CPU features that change which integer/float kernels a runtime picks.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "amx_int8", "amx_bf16", "asimd", "asimddp", "asimdhp", "i8mm", "sve", "sve2", "bf16")




def cpu_identity(cpuinfo: str | None = None, machine: str | None = None) -> dict[str, Any]:
    """The CPU as an engine sees it: architecture and the ISA features kernels dispatch on."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    model = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "cpu model") and not model:
            model = value.strip()
    return {"kind": "cpu", "machine": machine or platform.machine(), "model": model,
            "isa": sorted(flags & set(ISA_FLAGS))}


def has_vnni(identity: Mapping[str, Any]) -> bool:
    """True when the CPU has 8-bit dot-product instructions (x86 VNNI or ARM dotprod)."""
    isa = set(identity.get("isa", ()))
    return bool(isa & {"avx512_vnni", "avx_vnni", "asimddp", "amx_int8"})


def l4t_release(path: Path = Path("/etc/nv_tegra_release")) -> str | None:
    """The Jetson Linux (L4T) release, e.g. "R36.4.3"; None off a Jetson."""
    try:
        first = path.read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    # "# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ..."
    parts = [p.strip() for p in first.lstrip("# ").split(",")]
    major = parts[0].split()[0] if parts and parts[0] else ""
    revision = next((p.split(":", 1)[1].strip() for p in parts if p.upper().startswith("REVISION")), "")
    return f"{major}.{revision}" if major and revision else (major or None)


def jetson_model(path: Path = Path("/proc/device-tree/model")) -> str | None:
    """The board as the device tree names it ("NVIDIA Jetson Orin Nano Developer Kit"); None elsewhere.

    CUDA reports every Orin module as "Orin", compute capability 8.7; this is what tells
    AGX Orin, Orin NX and Orin Nano apart.
    """
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError:
        return None
    return text.replace("\0", "").strip() or None


def gpu_identity(name: str, compute_capability: str, l4t: str | None = None, *, board: str | None = None,
                 multiprocessors: int = 0, memory_bytes: int = 0, cuda: str = "") -> dict[str, Any]:
    """A GPU as an engine sees it: TensorRT plans (and timing caches) are valid only on this exact
    device: name + compute capability + L4T release + board (device-tree model) + SM count +
    memory (whole GiB rounded up: the total CUDA reports is the RAM less carve-outs, which move a
    little between boots and releases; 7.4 GiB is an 8 GB module) + CUDA version."""
    return {"kind": "gpu", "name": name, "compute_capability": compute_capability, "l4t": l4t or "none",
            "board": board or "none", "multiprocessors": int(multiprocessors),
            "memory_gib": math.ceil(memory_bytes / 2**30) if memory_bytes else 0, "cuda": cuda or "none"}


def gpu_identity_from_probe(device: Mapping[str, Any], l4t: str | None = None,
                            board: str | None = None) -> dict[str, Any]:
    """`gpu_identity` from a TensorRT probe's "device" (calibration.trt_child.probe)."""
    return gpu_identity(str(device.get("name")), str(device.get("compute_capability")), l4t, board=board,
                        multiprocessors=int(device.get("multiprocessors") or 0),
                        memory_bytes=int(device.get("total_memory") or 0),
                        cuda=str(device.get("cuda_runtime") or ""))


@dataclass(frozen=True)
class Fingerprint:
    """Everything an engine depends on. `key` is the sha256 of its canonical JSON."""

    model_sha256: str
    backend: str
    backend_version: str
    device: Mapping[str, Any]
    precision: str
    calibration_sha256: str = ""  # "" when no calibration set went in (fp32/fp16)
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "model_sha256": self.model_sha256, "backend": self.backend,
                "backend_version": self.backend_version, "device": dict(self.device), "precision": self.precision,
                "calibration_sha256": self.calibration_sha256, "options": dict(self.options)}

    @property
    def key(self) -> str:
        """sha256 (hex) of the canonical JSON of every field."""
        return hashlib.sha256(dumps(self.to_dict())).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    """A cached artifact and its sidecar record."""

    key: str
    directory: Path
    artifact: Path
    record: Mapping[str, Any]
    hit: bool

    @property
    def metadata(self) -> Mapping[str, Any]:
        """What the producer returned when the entry was built (e.g. the build report)."""
        value = self.record.get("metadata", {})
        return value if isinstance(value, Mapping) else {}


Producer = Callable[[Path], Mapping[str, Any]]


def sidecar_for(artifact: Path) -> Path:
    """`engine.plan` -> `engine.plan.cache.json`: the cache record beside the artifact."""
    return artifact.with_name(artifact.name + ".cache.json")


class EngineCache:
    """Engines (and QDQ models) on disk under one root, e.g. `<state_dir>/engines`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry_dir(self, fingerprint: Fingerprint) -> Path:
        """The directory an entry for `fingerprint` lives in (whether or not it exists)."""
        return self.root / fingerprint.key[:24]

    def lookup(self, fingerprint: Fingerprint, artifact_name: str) -> CacheEntry | None:
        """The entry for `fingerprint` if it is whole and matches; None otherwise (a miss)."""
        directory = self.entry_dir(fingerprint)
        artifact = directory / artifact_name
        sidecar = sidecar_for(artifact)
        try:
            record = read_json(sidecar)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("engine cache %s: unreadable sidecar (%s); rebuilding", directory.name, exc)
            return None
        if not isinstance(record, dict) or record.get("fingerprint") != fingerprint.to_dict():
            log.warning("engine cache %s: sidecar is for another fingerprint; rebuilding", directory.name)
            return None
        try:
            digest = sha256_file(artifact)
        except OSError:
            log.warning("engine cache %s: %s is missing; rebuilding", directory.name, artifact_name)
            return None
        if digest != record.get("artifact_sha256"):
            log.warning("engine cache %s: %s does not match its sidecar (damaged); rebuilding", directory.name,
                        artifact_name)
            return None
        return CacheEntry(fingerprint.key, directory, artifact, record, hit=True)

    def get_or_build(self, fingerprint: Fingerprint, artifact_name: str, produce: Producer) -> CacheEntry:
        """The cached entry, or build one: `produce(path)` writes the artifact at `path` (plus any
        files of its own beside it) and returns JSON-able metadata kept in the sidecar."""
        found = self.lookup(fingerprint, artifact_name)
        if found is not None:
            log.info("engine cache hit %s (%s)", found.directory.name, artifact_name)
            return found
        self.root.mkdir(parents=True, exist_ok=True)
        directory = self.entry_dir(fingerprint)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{directory.name}."))
        try:
            artifact = tmp / artifact_name
            started = time.monotonic()
            metadata = dict(produce(artifact))
            if not artifact.is_file():
                raise FileNotFoundError(f"the engine producer wrote no {artifact_name}")
            record = {"fingerprint": fingerprint.to_dict(), "key": fingerprint.key, "artifact": artifact_name,
                      "artifact_sha256": sha256_file(artifact), "artifact_bytes": artifact.stat().st_size,
                      "created": round(time.time(), 3), "build_seconds": round(time.monotonic() - started, 3),
                      "metadata": metadata}
            atomic_write_json(sidecar_for(artifact), record)
            if directory.exists():
                shutil.rmtree(directory)  # a stale or damaged entry under the same key
            os.replace(tmp, directory)
            fsync_dir(self.root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("engine cache miss %s: built %s", directory.name, artifact_name)
        return CacheEntry(fingerprint.key, directory, directory / artifact_name, record, hit=False)

    def timing_cache_path(self, backend: str, backend_version: str, device: Mapping[str, Any]) -> Path:
        """Where the timing cache for this backend version + device lives (model-independent)."""
        key = hashlib.sha256(dumps({"backend": backend, "version": backend_version, "device": dict(device)}))
        return self.root / "timing" / f"{backend}-{key.hexdigest()[:24]}.cache"

    def store_record(self, fingerprint: Fingerprint, name: str, record: Mapping[str, Any]) -> Path:
        """Keep a small JSON record (e.g. a gate decision) under `fingerprint`. Atomic."""
        path = self.entry_dir(fingerprint) / name
        atomic_write_json(path, {"fingerprint": fingerprint.to_dict(), "record": dict(record)})
        return path

    def load_record(self, fingerprint: Fingerprint, name: str) -> Mapping[str, Any] | None:
        """The record stored by `store_record` for exactly this fingerprint, or None."""
        path = self.entry_dir(fingerprint) / name
        try:
            data = read_json(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("engine cache record %s unreadable (%s); ignoring it", path, exc)
            return None
        if not isinstance(data, dict) or data.get("fingerprint") != fingerprint.to_dict():
            return None
        record = data.get("record")
        return record if isinstance(record, dict) else None

    def prune(self, keep: int, protect: set[str] | None = None) -> list[Path]:
        """Remove all but the `keep` most recently used entries (never those whose directory
        name is in `protect`). Returns what was removed. Keeps disk use bounded."""
        protect = protect or set()
        entries = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and p.name != "timing"] if self.root.is_dir() else []
        entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        removed = []
        for path in entries[keep:]:
            if path.name not in protect:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed
