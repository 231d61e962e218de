"""Try INT8 candidates in a defined order, keep the fastest that passes, fall back with reasons.

A `Candidate` is one way to serve a model: a precision, the quantizer profile that made
it (INT8) and the options it is served with (graph optimisation level, TensorRT route).
A `Target` (one per backend: `calibration.ort_target`, `calibration.trt_target`) knows
which candidates make sense on this device, how to prepare one (quantize, build, via
the engine cache) and how to open it. This module holds what is common:

1. the FP32 reference (ONNX Runtime, the original model) runs the holdout once;
2. each INT8 candidate, in the target's order, is prepared, run on the holdout and
   scored by the gate's metric; a failure to prepare is recorded, never fatal;
3. the candidates are timed together in alternating rounds (medians, so a noisy
   neighbour hurts all alike);
4. selection: the fastest INT8 candidate that passes the bound; on a target whose
   fallback is cheap to measure (CPU FP32), INT8 must also beat it by `min_speedup`,
   or FP32 serves. If none passes, the target's fallbacks (FP16 on GPU, then FP32)
   are tried in order. Every outcome carries a reason and the measured numbers.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from calibration.dataset import CalibrationSet
from calibration.errors import DeployError
from calibration.gate import Agreement, Observations, compare, observe
from calibration.progress import ProgressEvent, ProgressFn
from calibration.quantize import QuantProfile
from engines.errors import JetagentError
from engines.runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One way to serve a model."""

    name: str
    precision: str  # "int8" | "fp16" | "fp32"
    profile: QuantProfile | None = None  # how the INT8 model is made; None when nothing is quantized
    options: Mapping[str, Any] = field(default_factory=dict)  # how it is served (backend-specific)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "precision": self.precision,
                "profile": self.profile.to_dict() if self.profile else None, "options": dict(self.options)}


@dataclass(frozen=True)
class Prepared:
    """A candidate made ready: the file to open and how it came to be."""

    artifact: Path
    cache_hit: bool  # nothing had to be quantized or built this time
    seconds: float
    metadata: Mapping[str, Any] = field(default_factory=dict)


class Target(Protocol):
    """A backend's part in calibration: its candidates, and how to prepare and open them."""

    backend: str
    compare_with_fallback: bool  # True: INT8 must beat the first fallback's measured speed to serve

    def identity(self) -> tuple[str, Mapping[str, Any]]:
        """(backend version, device identity) for cache keys and reports."""

    def candidates(self, task: str) -> list[Candidate]:
        """INT8 candidates for a model of `task`, in the order they are tried."""

    def fallbacks(self) -> list[Candidate]:
        """What serves when no INT8 candidate passes, in order (FP16 then FP32 on GPU; FP32 on CPU)."""

    def prepare(self, candidate: Candidate, progress: ProgressFn) -> Prepared:
        """Quantize / build (or find in the cache) what `candidate` needs. Raises JetagentError."""

    def open(self, candidate: Candidate, prepared: Prepared) -> ModelRunner:
        """Open the prepared candidate as a runner. Raises JetagentError."""


@dataclass
class CandidateResult:
    """Everything measured about one candidate."""

    candidate: Candidate
    role: str  # "int8" | "fallback"
    status: str = "pending"  # passed | failed | error | skipped
    agreement: Agreement | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    prepared: Prepared | None = None
    error: str = ""
    runner: ModelRunner | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def p50(self) -> float:
        return self.latency_ms.get("p50", float("inf"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.candidate.to_dict(), "role": self.role, "status": self.status,
                               "passed": self.passed}
        if self.agreement is not None:
            out["agreement"] = self.agreement.to_dict()
        if self.latency_ms:
            out["latency_ms"] = {k: round(v, 3) for k, v in self.latency_ms.items()}
        if self.prepared is not None:
            out.update(artifact=str(self.prepared.artifact), cache_hit=self.prepared.cache_hit,
                       prepare_seconds=round(self.prepared.seconds, 2))
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class Selection:
    """The outcome: which candidate serves and why, with every candidate's numbers."""

    chosen: CandidateResult
    results: list[CandidateResult]
    reason: str
    fallback: bool  # INT8 was tried and something else serves
    metric: str
    minimum: float
    timing: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"selected": self.chosen.candidate.name, "precision": self.chosen.candidate.precision,
                "fallback": self.fallback, "reason": self.reason, "metric": self.metric, "minimum": self.minimum,
                "candidates": [r.to_dict() for r in self.results], "timing": self.timing}


@dataclass(frozen=True)
class TimingPlan:
    """How candidates are timed: `rounds` rounds, each running every candidate on
    `frames` holdout tensors in turn (order rotated each round), after `warmup` runs."""

    rounds: int = 5
    frames: int = 8
    warmup: int = 3


def _latency(samples: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(samples, dtype=np.float64) * 1e3
    return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean()), "runs": float(arr.size)}


def time_runners(runners: Mapping[str, ModelRunner], tensors: Sequence[np.ndarray], plan: TimingPlan,
                 ) -> dict[str, dict[str, float]]:
    """Inference latency (ms percentiles) of each runner, measured in alternating rounds."""
    names = list(runners)
    samples: dict[str, list[float]] = {n: [] for n in names}
    round_medians: dict[str, list[float]] = {n: [] for n in names}
    for name in names:
        for i in range(plan.warmup):
            runners[name].infer(tensors[i % len(tensors)])
    for r in range(plan.rounds):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in order:
            this_round = []
            for i in range(plan.frames):
                tensor = tensors[(r * plan.frames + i) % len(tensors)]
                t0 = time.perf_counter()
                runners[name].infer(tensor)
                this_round.append(time.perf_counter() - t0)
            samples[name].extend(this_round)
            round_medians[name].append(statistics.median(this_round) * 1e3)
    out = {}
    for name in names:
        stats = _latency(samples[name])
        stats["round_p50_spread"] = max(round_medians[name]) - min(round_medians[name]) if round_medians[name] else 0
        out[name] = stats
    return out


def _evaluate(target: Target, result: CandidateResult, metric: str, reference: Observations,
              dataset: CalibrationSet, minimum: float, progress: ProgressFn, fraction: float | None = None) -> None:
    name = result.candidate.name
    try:
        progress(ProgressEvent("quantize" if result.candidate.precision == "int8" else "build",
                               f"preparing {name}", name, fraction))
        result.prepared = target.prepare(result.candidate, progress)
        result.runner = target.open(result.candidate, result.prepared)
        progress(ProgressEvent("gate", f"comparing {name} with FP32 on {dataset.size[1]} held-out frames", name))
        observed = observe(result.runner, dataset, keep_outputs=bool(reference.outputs))
        result.agreement = compare(metric, reference, observed)
    except (JetagentError, OSError) as exc:  # OSError: a full disk fails this candidate, not the deployment
        result.status, result.error = "error", str(exc)
        log.warning("candidate %s: %s", name, exc)
        if result.runner is not None:
            result.runner.close()
            result.runner = None
        return
    result.status = "passed" if result.agreement.passes(minimum) else "failed"
    log.info("candidate %s: %s %.4f (%s)", name, result.agreement.metric, result.agreement.value, result.status)


def _time(results: Sequence[CandidateResult], dataset: CalibrationSet, plan: TimingPlan, progress: ProgressFn,
          ) -> None:
    runners = {r.candidate.name: r.runner for r in results if r.runner is not None and not r.latency_ms}
    if not runners:
        return
    progress(ProgressEvent("timing", f"timing {len(runners)} candidate(s): {plan.rounds} alternating rounds"))
    measured = time_runners(runners, [dataset.holdout[i] for i in range(dataset.size[1])], plan)
    for r in results:
        if r.candidate.name in measured:
            r.latency_ms = measured[r.candidate.name]


def _describe(results: Sequence[CandidateResult]) -> str:
    parts = []
    for r in results:
        if r.agreement is not None:
            parts.append(f"{r.candidate.name} {r.agreement.metric} {r.agreement.value:.3f}")
        else:
            parts.append(f"{r.candidate.name} {r.status}: {r.error}")
    return "; ".join(parts)


def select(target: Target, candidates: Sequence[Candidate], reference: Observations, dataset: CalibrationSet,
           metric: str, minimum: float, *, min_speedup: float = 1.05, timing: TimingPlan | None = None,
           measure_fallbacks: bool = False, progress: ProgressFn) -> Selection:
    """Evaluate `candidates` (INT8) and the target's fallbacks; choose what serves. The chosen
    result keeps its open runner; every other runner is closed. `measure_fallbacks` measures
    every fallback even when INT8 passes (benchmarks); it does not change the choice.
    Raises DeployError when nothing, not even the last fallback, can serve."""
    plan = timing or TimingPlan()
    int8 = [CandidateResult(c, "int8") for c in candidates]
    fallbacks = [CandidateResult(c, "fallback") for c in target.fallbacks()]
    done: list[CandidateResult] = []
    try:
        baseline = fallbacks[:1] if target.compare_with_fallback else []
        eager = int8 + (fallbacks if measure_fallbacks else baseline)
        for index, result in enumerate(eager):
            _evaluate(target, result, metric, reference, dataset, minimum, progress, index / (len(eager) + 1))
            done.append(result)
        _time(done, dataset, plan, progress)
        chosen, reason = _choose(int8, baseline, min_speedup, metric, minimum)
        if chosen is None:
            for result in fallbacks:
                if result not in done:
                    _evaluate(target, result, metric, reference, dataset, minimum, progress)
                    done.append(result)
                    _time(done, dataset, plan, progress)
                if result.passed:
                    chosen = result
                    reason += f"; serving {result.candidate.name}"
                    break
        if chosen is None:
            raise DeployError(f"nothing can serve this model: {reason}; fallbacks: {_describe(fallbacks)}")
    finally:
        for result in done:
            if result.runner is not None and (chosen is None or result is not chosen):
                result.runner.close()
                result.runner = None
    tried_int8 = bool(int8)
    results = done + [r for r in fallbacks if r not in done]
    for r in results:
        if r.status == "pending":
            r.status = "skipped"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    progress(ProgressEvent("select", f"serving {chosen.candidate.name}: {reason}", chosen.candidate.name))
    return Selection(chosen=chosen, results=results, reason=reason,
                     fallback=tried_int8 and chosen.candidate.precision != "int8", metric=metric, minimum=minimum,
                     timing={"rounds": plan.rounds, "frames_per_round": plan.frames,
                             "load_average": [round(v, 2) for v in load]})


def _value(result: CandidateResult) -> float:
    return result.agreement.value if result.agreement is not None else float("nan")


def _choose(int8: Sequence[CandidateResult], baseline: Sequence[CandidateResult], min_speedup: float, metric: str,
            minimum: float) -> tuple[CandidateResult | None, str]:
    passing = [r for r in int8 if r.passed]
    if not int8:
        return None, "no INT8 candidates to try"
    if not passing:
        return None, f"no INT8 candidate reached {metric} >= {minimum:g} ({_describe(int8)})"
    best = min(passing, key=lambda r: r.p50)
    base = next((r for r in baseline if r.passed), None)
    if base is not None and best.p50 * min_speedup > base.p50:
        return base, (f"INT8 candidate {best.candidate.name} passed ({metric} {_value(best):.3f}) "
                      f"but at {best.p50:.2f} ms it is not {min_speedup:g}x faster than "
                      f"{base.candidate.name} ({base.p50:.2f} ms); serving {base.candidate.name}")
    speed = f", {base.p50 / best.p50:.2f}x faster than {base.candidate.name}" if base is not None else ""
    return best, (f"fastest INT8 candidate that passed: {metric} {_value(best):.3f} >= {minimum:g}, "
                  f"{best.p50:.2f} ms{speed}")
