"""ONNX Runtime (CPU) as a calibration target.

For ONNX Runtime the "engine" is the QDQ ONNX the quantizer writes, served with a
session option that matters as much as the file: the graph optimisation level. Both
are part of a candidate. The QDQ file is cached like a TensorRT plan (keyed by model,
ORT version, CPU ISA, calibration set and quantizer profile), so a second start
quantizes nothing.

Default candidates (u8s8 is the fast layout for ORT's x86/ARM integer kernels):
per-channel min-max and percentile calibration served with full optimisation; on
CPUs without 8-bit dot-product instructions (no VNNI / dotprod) also reduce_range
and basic optimisation, because there ORT's u8s8 kernels can saturate and full
optimisation lost accuracy in our measurements (FACTS.md); for detectors, a
Conv-only variant. The gate measures every one; nothing here is assumed to work.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from calibration.candidates import Candidate, Prepared
from calibration.dataset import CalibrationSet
from calibration.engine_cache import EngineCache, Fingerprint, cpu_identity, has_vnni
from calibration.progress import ProgressEvent, ProgressFn
from calibration.quantize import QuantProfile, cpu_profile, export_qdq
from engines.base import BackendOptions
from engines.errors import BackendUnavailable
from engines.modelcard import ModelCard
from engines.runner import ModelRunner, open_model

QDQ_NAME = "model.qdq.onnx"


def ort_version() -> str:
    """The installed onnxruntime's version (part of cache keys)."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable(f"onnxruntime is not installed ({exc})") from exc
    return str(onnxruntime.__version__)


def cpu_candidates(task: str, *, vnni: bool, levels: tuple[str, ...] | None = None) -> list[Candidate]:
    """The default INT8 candidates for ONNX Runtime on this CPU, in the order they are tried."""
    profiles: list[QuantProfile] = [cpu_profile("minmax"), cpu_profile("percentile", percentile=99.999)]
    if not vnni:
        profiles.append(cpu_profile("minmax", reduce_range=True))
    if task == "detection":
        profiles.append(cpu_profile("minmax", op_types=("Conv",)))
    chosen_levels = levels or (("all",) if vnni else ("all", "basic"))
    return [ort_candidate(profile, level) for profile in profiles for level in chosen_levels]


def ort_candidate(profile: QuantProfile, graph_optimization: str = "all") -> Candidate:
    """An INT8 candidate: `profile`'s QDQ model served with `graph_optimization`."""
    return Candidate(name=f"int8-{profile.name}-opt-{graph_optimization}", precision="int8", profile=profile,
                     options={"graph_optimization": graph_optimization})


class OnnxRuntimeTarget:
    """Prepares and opens candidates on ONNX Runtime's CPU execution provider."""

    backend = "onnxruntime"
    compare_with_fallback = True  # FP32 costs nothing to measure here: INT8 must beat it

    def __init__(self, model_path: Path, card: ModelCard, model_sha256: str, dataset: CalibrationSet | None,
                 cache: EngineCache, *, threads: int = 0, providers: tuple[str, ...] = (),
                 graph_optimization: str = "all", cpuinfo: str | None = None) -> None:
        self.model_path = model_path
        self.card = card
        self.model_sha256 = model_sha256
        self.dataset = dataset
        self.cache = cache
        self.threads = threads
        self.providers = providers
        self.graph_optimization = graph_optimization
        self._version = ort_version()
        self._device = cpu_identity(cpuinfo)

    @classmethod
    def from_config(cls, model_path: Path, card: ModelCard, model_sha256: str, dataset: CalibrationSet | None,
                    cache: EngineCache, config: Any) -> OnnxRuntimeTarget:
        """Built by `calibration.deploy` from its DeployConfig."""
        return cls(model_path, card, model_sha256, dataset, cache, threads=config.threads,
                   providers=tuple(config.providers), graph_optimization=config.graph_optimization)

    def identity(self) -> tuple[str, Mapping[str, Any]]:
        return self._version, self._device

    def candidates(self, task: str) -> list[Candidate]:
        return cpu_candidates(task, vnni=has_vnni(self._device))

    def fallbacks(self) -> list[Candidate]:
        return [Candidate(name=f"fp32-opt-{self.graph_optimization}", precision="fp32",
                          options={"graph_optimization": self.graph_optimization})]

    def fingerprint(self, profile: QuantProfile) -> Fingerprint:
        """The cache key of a QDQ model: what it was made from, by which quantizer, for which CPU."""
        if self.dataset is None:
            raise BackendUnavailable("an INT8 candidate needs a calibration set")
        return Fingerprint(model_sha256=self.model_sha256, backend=self.backend, backend_version=self._version,
                           device=self._device, precision="int8", calibration_sha256=self.dataset.content_hash,
                           options={"artifact": "qdq-onnx", "profile": profile.to_dict()})

    def prepare(self, candidate: Candidate, progress: ProgressFn) -> Prepared:
        if candidate.profile is None:
            return Prepared(artifact=self.model_path, cache_hit=True, seconds=0.0)
        profile, dataset = candidate.profile, self.dataset
        if dataset is None:
            raise BackendUnavailable("an INT8 candidate needs a calibration set")

        def produce(path: Path) -> dict[str, Any]:
            progress(ProgressEvent("quantize", f"quantizing with {profile.name} on {dataset.size[0]} frames",
                                   candidate.name))
            return export_qdq(self.model_path, path, dataset, profile).to_dict()

        entry = self.cache.get_or_build(self.fingerprint(profile), QDQ_NAME, produce)
        seconds = 0.0 if entry.hit else float(entry.record.get("build_seconds", 0.0))
        return Prepared(artifact=entry.artifact, cache_hit=entry.hit, seconds=seconds, metadata=entry.metadata)

    def open(self, candidate: Candidate, prepared: Prepared) -> ModelRunner:
        level = str(candidate.options.get("graph_optimization", self.graph_optimization))
        options = BackendOptions(threads=self.threads, providers=self.providers, graph_optimization=level,
                                 precision=candidate.precision)
        return open_model(prepared.artifact, card=self.card, backend=self.backend, options=options,
                          sha256=self.model_sha256)
