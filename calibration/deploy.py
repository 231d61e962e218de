"""The one entry point deployment calls: model + calibration set -> the runner that serves.

    deployment = deploy_model(model_path, card, dataset, DeployConfig.from_backend(config.backend),
                              manifest.accuracy, state_dir=config.state_dir, progress=report_progress)
    old = pipeline.swap(deployment.runner)       # the runner is open and warmed up
    deploy_state["calibration"] = deployment.summary   # JSON-able

What happens (all off the camera thread; call it from the updater's worker):

1. The target for the configured backend (`onnxruntime`, `tensorrt`) names its INT8
   candidates and fallbacks for this device.
2. If a decision for exactly these inputs was made before (same model sha256, backend
   version, device, calibration-set hash, candidates, bound), it is reused: the chosen
   engine comes from the engine cache and nothing is quantized, built or gated again.
3. Otherwise the FP32 reference (ONNX Runtime, original model) runs the holdout, every
   candidate is prepared (cached), gated and timed, and the fastest that passes serves;
   if none passes, the fallbacks (FP16 on GPU, then FP32) are tried, and the summary
   says why, with the numbers. A calibration report is written beside the engine.

Without a calibration set, or when FP32 is what the config asks for, FP32 serves
directly and the summary says so. Errors: CalibrationError (the set does not fit the
model), DeployError (nothing could serve), and the engines' own JetagentErrors.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibration.candidates import Candidate, CandidateResult, Selection, Target, TimingPlan, select
from calibration.dataset import CalibrationSet
from calibration.engine_cache import EngineCache, Fingerprint
from calibration.errors import DeployError
from calibration.gate import MIN_REFERENCE_OBJECTS, BoundLike, GateBound, observe, resolve_metric
from calibration.progress import ProgressEvent, ProgressFn, safe
from engines.base import PRECISIONS, BackendOptions
from engines.errors import BackendUnavailable, JetagentError
from engines.fileio import atomic_write_json
from engines.modelcard import ModelCard
from engines.runner import ModelRunner, file_sha256, open_model

log = logging.getLogger(__name__)

REPORT_NAME = "calibration-report.json"
DECISION_NAME = "decision.json"
REPORT_FORMAT = 1

# backend name -> "module:factory"; resolved only when that backend is deployed to.
TARGETS: dict[str, str] = {
    "onnxruntime": "calibration.ort_target:OnnxRuntimeTarget",
    "tensorrt": "calibration.trt_target:TensorRTTarget",
}


@dataclass(frozen=True)
class DeployConfig:
    """How to deploy: the backend and its options, and how hard to look for INT8.

    `candidates` replaces the target's default INT8 list (in order). `min_speedup`: on a
    target where FP32 is measured alongside (CPU), INT8 serves only if at least this much
    faster. `trt_launcher`: the command that starts the TensorRT build child (tests).
    """

    backend: str = "onnxruntime"
    precision: str = "int8"
    threads: int = 0
    providers: tuple[str, ...] = ()
    graph_optimization: str = "all"
    workspace_bytes: int | None = None
    dla_core: int | None = None
    device_index: int = 0
    build_timeout_s: float = 1800.0
    candidates: tuple[Candidate, ...] | None = None
    min_speedup: float = 1.05
    timing: TimingPlan = field(default_factory=TimingPlan)
    trt_launcher: tuple[str, ...] | None = None
    measure_fallbacks: bool = False  # benchmarks: also measure FP16/FP32 when INT8 passes

    @classmethod
    def from_backend(cls, backend: Any, **overrides: Any) -> DeployConfig:
        """From the agent's `[backend]` config (any object with name/precision/threads/providers/
        graph_optimization, and optionally workspace_bytes/dla_core), plus overrides."""
        fields: dict[str, Any] = {"backend": backend.name, "precision": backend.precision,
                                  "threads": backend.threads, "providers": tuple(backend.providers),
                                  "graph_optimization": backend.graph_optimization}
        for optional in ("workspace_bytes", "dla_core", "device_index", "build_timeout_s"):
            if getattr(backend, optional, None) is not None:
                fields[optional] = getattr(backend, optional)
        return cls(**{**fields, **overrides})

    def validate(self) -> None:
        """Raise JetagentError / BackendUnavailable for an unknown precision or backend."""
        if self.precision not in PRECISIONS:
            raise JetagentError(f"deploy precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.backend not in TARGETS:
            raise BackendUnavailable(f"no calibration target for backend {self.backend!r}; "
                                     f"choose one of {', '.join(TARGETS)}")


@dataclass
class Deployment:
    """What serves now. The caller owns `runner` (swap it in, close the old one)."""

    runner: ModelRunner
    engine_path: Path
    precision: str  # what actually serves
    summary: dict[str, Any]  # JSON-able: for the deploy state
    report_path: Path | None
    reused: bool  # a stored decision was reused: nothing was quantized, built or gated
    report: dict[str, Any] = field(default_factory=dict)  # the full calibration report (not when reused)


def make_target(config: DeployConfig, model_path: Path, card: ModelCard, sha256: str,
                dataset: CalibrationSet | None, cache: EngineCache) -> Target:
    """The calibration target for `config.backend` (imported only when asked for)."""
    config.validate()
    module_name, cls_name = TARGETS[config.backend].split(":")
    factory = getattr(importlib.import_module(module_name), cls_name)
    target: Target = factory.from_config(model_path, card, sha256, dataset, cache, config)
    return target


def _decision_fingerprint(target: Target, sha256: str, dataset: CalibrationSet | None, config: DeployConfig,
                          candidates: list[Candidate], metric: str, minimum: float) -> Fingerprint:
    version, device = target.identity()
    return Fingerprint(
        model_sha256=sha256, backend=target.backend, backend_version=version, device=device,
        precision=f"decision-{config.precision}", calibration_sha256=dataset.content_hash if dataset else "",
        options={"candidates": [c.to_dict() for c in candidates],
                 "fallbacks": [c.to_dict() for c in target.fallbacks()], "metric": metric, "minimum": minimum,
                 "min_speedup": config.min_speedup, "threads": config.threads, "providers": list(config.providers),
                 "graph_optimization": config.graph_optimization, "dla_core": config.dla_core,
                 "workspace_bytes": config.workspace_bytes})


def deploy_model(model_path: str | Path, card: ModelCard, dataset: CalibrationSet | None, config: DeployConfig,
                 bound: BoundLike | None = None, *, state_dir: Path, progress: ProgressFn | None = None,
                 model_sha256: str | None = None, reuse: bool = True) -> Deployment:
    """Choose, prepare and open the engine that serves `model_path`. See the module docstring.

    `reuse=False` decides again even when a stored decision exists (benchmarks); the
    engine cache is still used for quantized models and plans."""
    started = time.monotonic()
    notify = safe(progress)
    path = Path(model_path)
    bound = bound or GateBound()
    sha256 = model_sha256 or file_sha256(path)
    cache = EngineCache(Path(state_dir) / "engines")
    target = make_target(config, path, card, sha256, dataset, cache)
    metric = resolve_metric(card.task, bound.metric)
    if dataset is not None:
        dataset.check_spec(card.input)
    gated = dataset is not None and config.precision != "fp32"
    candidates = list(config.candidates if config.candidates is not None else target.candidates(card.task)) \
        if gated and config.precision == "int8" else []
    decision = _decision_fingerprint(target, sha256, dataset if gated else None, config, candidates, metric,
                                     bound.minimum)
    stored = cache.load_record(decision, DECISION_NAME) if reuse else None
    if stored is not None:
        reused = _reuse(target, stored, candidates, notify)
        if reused is not None:
            return reused
    if not gated:
        return _serve_fp32(target, config, dataset, decision, cache, notify, started)
    if dataset is None:  # for mypy: gated implies a dataset
        raise DeployError("internal: gating without a calibration set")
    notify(ProgressEvent("gate", f"running the FP32 reference on {dataset.size[1]} held-out frames"))
    reference_runner = open_model(path, card=card, backend="onnxruntime", sha256=sha256,
                                  options=BackendOptions(threads=config.threads, graph_optimization="all"))
    try:
        # Raw outputs are kept only when cosine decides: a YOLO head's outputs on 48 frames are ~130 MB.
        reference = observe(reference_runner, dataset, keep_outputs=metric == "cosine")
        if metric == "detection_f1" and sum(len(r) for r in reference.results) < MIN_REFERENCE_OBJECTS:
            reference = observe(reference_runner, dataset, keep_outputs=True)  # F1 would say nothing
    finally:
        reference_runner.close()
    selection = select(target, candidates, reference, dataset, metric, bound.minimum,
                       min_speedup=config.min_speedup, timing=config.timing,
                       measure_fallbacks=config.measure_fallbacks, progress=notify)
    if config.precision == "fp16" and not any(r.candidate.precision == "fp16" for r in selection.results):
        selection.reason = f"{target.backend} has no FP16 path on this device; {selection.reason}"
    return _finish(target, selection, config, dataset, decision, cache, notify, started)


def _summary(target: Target, selection: Selection, config: DeployConfig, dataset: CalibrationSet | None,
             ) -> dict[str, Any]:
    chosen = selection.chosen
    fp32 = next((r for r in selection.results if r.candidate.precision == "fp32" and r.latency_ms), None)
    version, _ = target.identity()

    def brief(r: CandidateResult) -> dict[str, Any]:
        out: dict[str, Any] = {"name": r.candidate.name, "precision": r.candidate.precision, "status": r.status}
        if r.agreement is not None:
            out["value"] = round(r.agreement.value, 4)
        if r.latency_ms:
            out["p50_ms"] = round(r.p50, 3)
        if r.error:
            out["error"] = r.error[:300]
        return out

    summary: dict[str, Any] = {
        "precision": chosen.candidate.precision, "requested": config.precision, "backend": target.backend,
        "backend_version": version, "candidate": chosen.candidate.name, "options": dict(chosen.candidate.options),
        "fallback": selection.fallback, "reason": selection.reason, "metric": selection.metric,
        "minimum": selection.minimum,
        "value": round(chosen.agreement.value, 4) if chosen.agreement is not None else None,
        "latency_ms": round(chosen.p50, 3) if chosen.latency_ms else None,
        "candidates": [brief(r) for r in selection.results],
        "calibration_set": ({"sha256": dataset.content_hash, "calibration": dataset.size[0],
                             "holdout": dataset.size[1]} if dataset is not None else None),
    }
    if fp32 is not None and chosen.latency_ms:
        summary["fp32_latency_ms"] = round(fp32.p50, 3)
        summary["speedup_vs_fp32"] = round(fp32.p50 / chosen.p50, 3) if chosen.p50 > 0 else None
    return summary


def _finish(target: Target, selection: Selection, config: DeployConfig, dataset: CalibrationSet | None,
            decision: Fingerprint, cache: EngineCache, notify: ProgressFn, started: float) -> Deployment:
    chosen = selection.chosen
    runner, prepared = chosen.runner, chosen.prepared
    if runner is None or prepared is None:
        raise DeployError(f"internal: chosen candidate {chosen.candidate.name} has no open runner")
    summary = _summary(target, selection, config, dataset)
    version, device = target.identity()
    report = {"format": REPORT_FORMAT, "kind": "jetagent.calibration-report", "created": round(time.time(), 3),
              "seconds": round(time.monotonic() - started, 2), "model_sha256": decision.model_sha256,
              "backend": {"name": target.backend, "version": version}, "device": dict(device),
              "calibration_set": dataset.summary() if dataset is not None else None,
              "bound": {"minimum": selection.minimum, "metric": selection.metric},
              "engine": str(prepared.artifact), **selection.summary()}
    report_path = _write_reports(cache, decision, prepared.artifact, report)
    summary.update(report=str(report_path), reused=False)
    cache.store_record(decision, DECISION_NAME, {"candidate": chosen.candidate.to_dict(), "summary": summary})
    _warm_up(runner, dataset)
    log.info("serving %s (%s): %s", chosen.candidate.name, chosen.candidate.precision, selection.reason)
    return Deployment(runner=runner, engine_path=prepared.artifact, precision=runner.precision, summary=summary,
                      report_path=report_path, reused=False, report=report)


def _write_reports(cache: EngineCache, decision: Fingerprint, artifact: Path, report: Mapping[str, Any]) -> Path:
    """The report goes in the decision's cache entry, and beside the engine when the engine
    is one of ours (never into a model file's own folder)."""
    path = cache.entry_dir(decision) / REPORT_NAME
    atomic_write_json(path, report)
    try:
        artifact.resolve().relative_to(cache.root.resolve())
    except ValueError:
        return path
    atomic_write_json(artifact.with_name(REPORT_NAME), report)
    return artifact.with_name(REPORT_NAME)


def _serve_fp32(target: Target, config: DeployConfig, dataset: CalibrationSet | None, decision: Fingerprint,
                cache: EngineCache, notify: ProgressFn, started: float) -> Deployment:
    fp32 = next((c for c in reversed(target.fallbacks()) if c.precision == "fp32"), None)
    if fp32 is None:
        raise DeployError(f"{target.backend}: no FP32 candidate")
    result = CandidateResult(fp32, "fallback")
    result.prepared = target.prepare(fp32, notify)
    result.runner = target.open(fp32, result.prepared)
    result.status = "passed"
    if config.precision == "fp32":
        reason = "FP32 asked for; not gated (it is the reference)"
    else:
        reason = f"{config.precision.upper()} asked for but there is no calibration set; serving FP32 ungated"
    selection = Selection(chosen=result, results=[result], reason=reason,
                          fallback=config.precision != "fp32", metric="none", minimum=0.0)
    return _finish(target, selection, config, dataset, decision, cache, notify, started)


def _reuse(target: Target, stored: Mapping[str, Any], candidates: list[Candidate], notify: ProgressFn,
           ) -> Deployment | None:
    summary = stored.get("summary")
    chosen = stored.get("candidate")
    if not isinstance(summary, dict) or not isinstance(chosen, dict):
        return None
    known = {c.name: c for c in [*candidates, *target.fallbacks()]}
    candidate = known.get(str(chosen.get("name")))
    if candidate is None or candidate.to_dict() != chosen:
        return None
    notify(ProgressEvent("cached", f"reusing the earlier decision: {candidate.name}", candidate.name))
    try:
        prepared = target.prepare(candidate, notify)
        runner = target.open(candidate, prepared)
    except JetagentError as exc:
        log.warning("stored decision %s cannot be reused (%s); deciding again", candidate.name, exc)
        return None
    _warm_up(runner, None)
    report = summary.get("report")
    log.info("serving %s (%s), decided earlier: %s", candidate.name, candidate.precision, summary.get("reason"))
    return Deployment(runner=runner, engine_path=prepared.artifact, precision=runner.precision,
                      summary={**summary, "reused": True, "engine_cache_hit": prepared.cache_hit},
                      report_path=Path(report) if isinstance(report, str) else None, reused=True)


def _warm_up(runner: ModelRunner, dataset: CalibrationSet | None, runs: int = 2) -> None:
    """First-call allocations happen before the runner serves a camera frame."""
    if dataset is not None and dataset.size[1]:
        tensor = dataset.holdout[0]
    else:
        import numpy as np

        tensor = np.zeros(runner.card.input.tensor_shape(), dtype=np.dtype(runner.card.input.dtype))
    for _ in range(runs):
        runner.infer(tensor)

