"""TensorRT as a calibration target (written to the documented API; not yet run on a GPU).

What this TensorRT can do is asked of a child process (`calibration.build.probe_tensorrt`),
so the route choice follows the installed module, never a version string:

* explicit quantization ("explicit-qdq", TensorRT 10.x and 11.x): ONNX Runtime's quantizer
  writes a QDQ ONNX with the TensorRT profile (s8s8 symmetric, per-channel, float biases),
  built as a strongly typed network. Candidates: percentile, Conv-only for detectors, min-max.
* implicit calibration ("implicit-calibrator", 8.5-10.x; removed in 11): the float ONNX and an
  entropy calibrator fed with the calibration set, with a calibration cache.

Fallbacks: FP16 (BuilderFlag.FP16 on 8.5-10.x; on 11.x FP16 needs an FP16 ONNX from
ModelOpt AutoCast, which jetagent does not make, so the fallback is reported as
unavailable), then FP32. Every engine is built in a child process with a timeout,
cached by fingerprint (the device identity includes the board's device-tree model, SM
count, memory and CUDA version; a plan's key includes the sha256 of the ONNX it was built
from), with the timing cache keyed by TensorRT version + device. A model with dynamic
input dimensions builds with an optimization profile: the one given, or every dynamic
dimension pinned to the model card's input shape.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from calibration.build import DEFAULT_LAUNCHER, build_in_child, probe_tensorrt
from calibration.candidates import Candidate, Prepared
from calibration.dataset import CalibrationSet, CalibrationStore
from calibration.engine_cache import EngineCache, Fingerprint, gpu_identity_from_probe, jetson_model, l4t_release
from calibration.ort_target import QDQ_NAME, ort_version
from calibration.progress import ProgressEvent, ProgressFn
from calibration.quantize import QuantProfile, export_qdq, tensorrt_profile
from engines.base import BackendOptions
from engines.errors import BackendUnavailable, JetagentError
from engines.fileio import sha256_file
from engines.modelcard import ModelCard
from engines.runner import ModelRunner, open_model
from engines.trt_build import BuildRequest, BuildUnsupported, PrecisionUnavailable
from engines.trt_profiles import ProfileShapes, fixed_profile, onnx_input_shapes, profile_to_json

log = logging.getLogger(__name__)

PLAN_NAME = "engine.plan"


def trt_candidates(task: str, routes: Sequence[str]) -> list[Candidate]:
    """Default INT8 candidates for the routes this TensorRT has, in the order they are tried."""
    out: list[Candidate] = []
    if "explicit-qdq" in routes:
        profiles = [tensorrt_profile("percentile")]
        if task == "detection":
            profiles.append(tensorrt_profile("percentile", op_types=("Conv",)))
        profiles.append(tensorrt_profile("minmax"))
        out += [Candidate(f"int8-{p.name}", "int8", p, {"int8_route": "explicit-qdq"}) for p in profiles]
    if "implicit-calibrator" in routes:
        out.append(Candidate("int8-trt-implicit-entropy", "int8", None,
                             {"int8_route": "implicit-calibrator", "calibrator": "entropy"}))
    return out


class TensorRTTarget:
    """Prepares (QDQ export + engine build in a child) and opens TensorRT candidates."""

    backend = "tensorrt"
    compare_with_fallback = False  # an FP16 build takes minutes; built only when INT8 fails

    def __init__(self, model_path: Path, card: ModelCard, model_sha256: str, dataset: CalibrationSet | None,
                 cache: EngineCache, *, workspace_bytes: int | None = None, dla_core: int | None = None,
                 device_index: int = 0, timeout_s: float = 1800.0,
                 launcher: Sequence[str] = DEFAULT_LAUNCHER,
                 profile_shapes: Mapping[str, ProfileShapes] | None = None) -> None:
        """`profile_shapes`: shape ranges for inputs with dynamic dimensions (e.g. a batch range for a
        runner several cameras share); by default every dynamic dimension is pinned to the card's input."""
        self.model_path = model_path
        self.card = card
        self.model_sha256 = model_sha256
        self.dataset = dataset
        self.cache = cache
        self.workspace_bytes = workspace_bytes
        self.dla_core = dla_core
        self.device_index = device_index
        self.timeout_s = timeout_s
        self.launcher = tuple(launcher)
        self.profile_shapes = dict(profile_shapes) if profile_shapes else None
        self._probe: Mapping[str, Any] | None = None

    @classmethod
    def from_config(cls, model_path: Path, card: ModelCard, model_sha256: str, dataset: CalibrationSet | None,
                    cache: EngineCache, config: Any) -> TensorRTTarget:
        """Built by `calibration.deploy` from its DeployConfig."""
        return cls(model_path, card, model_sha256, dataset, cache, workspace_bytes=config.workspace_bytes,
                   dla_core=config.dla_core, device_index=config.device_index, timeout_s=config.build_timeout_s,
                   launcher=config.trt_launcher or DEFAULT_LAUNCHER)

    @property
    def probe(self) -> Mapping[str, Any]:
        """TensorRT version, routes and GPU, asked of a child process once."""
        if self._probe is None:
            self._probe = probe_tensorrt(self.device_index, launcher=self.launcher)
            log.info("TensorRT %s on %s: routes %s", self._probe.get("tensorrt_version"),
                     self._probe.get("device", {}).get("name"), ", ".join(self._probe.get("routes", [])))
        return self._probe

    @property
    def routes(self) -> list[str]:
        return [str(r) for r in self.probe.get("routes", [])]

    def identity(self) -> tuple[str, Mapping[str, Any]]:
        device = self.probe.get("device", {})
        return str(self.probe.get("tensorrt_version")), gpu_identity_from_probe(device, l4t_release(), jetson_model())

    def _profile_for(self, onnx_path: Path) -> dict[str, ProfileShapes] | None:
        """The optimization profile to build `onnx_path` with: the one given, else dynamic inputs pinned
        to the card's input shape (the camera pipeline feeds exactly that)."""
        if self.profile_shapes:
            return self.profile_shapes
        inputs = onnx_input_shapes(onnx_path)
        if inputs is None:
            return None  # no onnx package: a dynamic model fails in the build with the reason
        try:
            return fixed_profile(inputs, {self.card.input.name: self.card.input.tensor_shape()})
        except JetagentError as exc:
            raise BuildUnsupported(f"{onnx_path.name}: {exc}") from exc

    def candidates(self, task: str) -> list[Candidate]:
        return trt_candidates(task, self.routes)

    def fallbacks(self) -> list[Candidate]:
        return [Candidate("fp16-trt", "fp16", None, {"fp16_route": "fp16-flag"}),
                Candidate("fp32-trt", "fp32", None, {})]

    def _build_options(self) -> dict[str, Any]:
        return {"workspace_bytes": self.workspace_bytes, "dla_core": self.dla_core}

    def _qdq(self, profile: QuantProfile, candidate: str, progress: ProgressFn) -> Path:
        dataset = self._dataset()
        _, device = self.identity()
        fingerprint = Fingerprint(
            model_sha256=self.model_sha256, backend="onnxruntime-quantizer", backend_version=ort_version(),
            device=device, precision="int8", calibration_sha256=dataset.content_hash,
            options={"artifact": "qdq-onnx", "profile": profile.to_dict()})

        def produce(path: Path) -> dict[str, Any]:
            progress(ProgressEvent("quantize", f"exporting QDQ with {profile.name}", candidate))
            return export_qdq(self.model_path, path, dataset, profile).to_dict()

        return self.cache.get_or_build(fingerprint, QDQ_NAME, produce).artifact

    def _dataset(self) -> CalibrationSet:
        if self.dataset is None:
            raise BackendUnavailable("an INT8 candidate needs a calibration set")
        return self.dataset

    def prepare(self, candidate: Candidate, progress: ProgressFn) -> Prepared:
        version, device = self.identity()
        opts = dict(candidate.options)
        route = str(opts.get("int8_route" if candidate.precision == "int8" else "fp16_route", "auto"))
        if candidate.precision == "fp16" and route not in self.routes:
            raise PrecisionUnavailable(f"FP16 via {route} is not available in TensorRT {version}"
                                       + ("; TensorRT 11 builds FP16 only from an FP16 ONNX (ModelOpt AutoCast)"
                                          if "fp16-onnx" in self.routes else ""))
        if candidate.precision == "int8" and route not in self.routes:
            raise PrecisionUnavailable(f"INT8 via {route} is not available in TensorRT {version}")
        onnx_path = self._qdq(candidate.profile, candidate.name, progress) if candidate.profile else self.model_path
        calibration_dir = None
        if route == "implicit-calibrator":
            calibration_dir = CalibrationStore(self.cache.root / "calibration-sets").save(self._dataset())
        profile_shapes = self._profile_for(onnx_path)
        fingerprint = Fingerprint(
            model_sha256=self.model_sha256, backend=self.backend, backend_version=version, device=device,
            precision=candidate.precision,
            calibration_sha256=self._dataset().content_hash if candidate.precision == "int8" else "",
            options={**opts, **self._build_options(),
                     "profile": candidate.profile.to_dict() if candidate.profile else None,
                     # the exact file built: a re-exported QDQ (new ONNX Runtime, new quantizer) is a new plan
                     "onnx_sha256": sha256_file(onnx_path) if onnx_path != self.model_path else self.model_sha256,
                     "profile_shapes": profile_to_json(profile_shapes)})
        timing_cache = self.cache.timing_cache_path(self.backend, version, device)
        timing_cache.parent.mkdir(parents=True, exist_ok=True)

        def produce(plan: Path) -> dict[str, Any]:
            request = BuildRequest(
                precision=candidate.precision,
                int8_route=route if candidate.precision == "int8" else "auto",
                fp16_route=route if candidate.precision == "fp16" else "auto",
                calibration_cache=plan.with_name("calibration.cache") if calibration_dir else None,
                calibrator=str(opts.get("calibrator", "entropy")), workspace_bytes=self.workspace_bytes,
                dla_core=self.dla_core, timing_cache=timing_cache, device_index=self.device_index,
                profile_shapes=profile_shapes)
            return build_in_child(onnx_path, plan, request, calibration_set=calibration_dir,
                                  timeout_s=self.timeout_s, progress=progress, launcher=self.launcher,
                                  candidate=candidate.name)

        entry = self.cache.get_or_build(fingerprint, PLAN_NAME, produce)
        built = entry.metadata.get("precision_built")
        if built != candidate.precision:
            raise PrecisionUnavailable(f"asked TensorRT for {candidate.precision}, the build report says {built}")
        seconds = 0.0 if entry.hit else float(entry.record.get("build_seconds", 0.0))
        return Prepared(artifact=entry.artifact, cache_hit=entry.hit, seconds=seconds, metadata=entry.metadata)

    def open(self, candidate: Candidate, prepared: Prepared) -> ModelRunner:
        extra: dict[str, Any] = {"device_index": self.device_index}
        if self.dla_core is not None:
            extra["dla_core"] = self.dla_core
        return open_model(prepared.artifact, card=self.card, backend=self.backend, sha256=self.model_sha256,
                          options=BackendOptions(precision=candidate.precision, extra=extra))
