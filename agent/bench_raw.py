"""`jetagent bench MODEL.onnx` with no card: the backend alone on generated inputs.

What `trtexec --onnx=m.onnx` and `polygraphy run m.onnx --onnxrt` do: inputs generated at the
model's own shapes, dynamic dims from `--shapes name:1x3x640x640[,name2:...]` (trtexec's
spelling), and a clear error naming the dynamic dims when they are not given. A dynamic
leading batch dim alone defaults to 1 (and the report says so). With `--backend tensorrt`
an ONNX file is first built into an FP32 engine at those shapes (in a child process, as
deployments build), and the build time is reported apart from the load time.
"""

from __future__ import annotations

import resource
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.camera.stats import Histogram
from engines.base import Backend, BackendOptions, TensorSpec, open_backend
from engines.errors import InferenceError, JetagentError, ModelMismatch
from engines.fileio import sha256_file

Shapes = dict[str, tuple[int, ...]]


class ShapeError(JetagentError):
    """--shapes is malformed, names an unknown input, or dynamic dims are left without a size."""


@dataclass
class RawBenchOptions:
    model: Path
    backend: str = "onnxruntime"
    shapes: str | None = None  # --shapes, trtexec's spelling
    threads: int = 0
    graph_optimization: str = "all"
    duration_s: float = 10.0
    warmup: int = 10
    rounds: int = 2
    inputs: int = 4  # distinct generated input sets the loop cycles through
    notes: list[str] = field(default_factory=list)
    build_launcher: tuple[str, ...] | None = None  # the TensorRT build child (tests: a stand-in TensorRT)


def parse_shapes(text: str) -> Shapes:
    """"images:1x3x640x640,mask:1x1x640x640" -> {"images": (1, 3, 640, 640), ...}. A name may
    itself contain ':' (TensorFlow's "Preprocessor/sub:0"): the shape is after the last one;
    quotes around the name are allowed, as trtexec allows them."""
    out: Shapes = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, sep, dims = item.rpartition(":")
        name = name.strip().strip("'\"")
        if not sep or not name or not dims:
            raise ShapeError(f"--shapes {item!r}: write NAME:DxDxD (e.g. images:1x3x640x640)")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise ShapeError(f"--shapes {item!r}: dims must be integers joined by x (e.g. 1x3x640x640)") from None
        if any(d <= 0 for d in shape):
            raise ShapeError(f"--shapes {item!r}: every dim must be positive")
        if name in out:
            raise ShapeError(f"--shapes names {name!r} twice")
        out[name] = shape
    if not out:
        raise ShapeError("--shapes is empty; write NAME:DxDxD[,NAME2:...]")
    return out


def _dim_text(d: int | str | None) -> str:
    return str(d) if isinstance(d, int) and d > 0 else (d if isinstance(d, str) and d else "?")


def resolve_shapes(inputs: Sequence[TensorSpec], given: Shapes | None,
                   suggestion: Mapping[str, tuple[int, ...]] | None = None) -> tuple[Shapes, list[str]]:
    """Concrete shapes for every input, and notes (what was defaulted). Raises ShapeError naming
    every dynamic dim that needs a size."""
    given = dict(given or {})
    names = {t.name for t in inputs}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ShapeError(f"--shapes names {', '.join(map(repr, unknown))}, which the model does not have "
                         f"(inputs: {', '.join(t.name for t in inputs)})")
    shapes: Shapes = {}
    notes: list[str] = []
    missing: list[str] = []
    for t in inputs:
        declared = [_dim_text(d) for d in t.shape]
        if t.name in given:
            shape = given[t.name]
            if len(shape) != len(t.shape):
                raise ShapeError(f"--shapes {t.name}: {len(shape)} dims given, the input has {len(t.shape)} "
                                 f"[{', '.join(declared)}]")
            for axis, (have, want) in enumerate(zip(t.shape, shape)):
                if isinstance(have, int) and have > 0 and have != want:
                    raise ShapeError(f"--shapes {t.name}: axis {axis} is fixed at {have} in the model, not {want}")
            shapes[t.name] = shape
            continue
        dynamic = [i for i, d in enumerate(t.shape) if not (isinstance(d, int) and d > 0)]
        if dynamic == [0] and len(t.shape) > 1:
            shapes[t.name] = (1, *(int(d) for d in t.shape[1:]))  # type: ignore[arg-type]
            notes.append(f"{t.name}: dynamic batch dim {declared[0]} set to 1 (--shapes to change it)")
            continue
        if dynamic:
            dims = ", ".join(f"{declared[i]} (axis {i})" for i in dynamic)
            missing.append(f"input {t.name!r} [{', '.join(declared)}] has dynamic dims {dims}")
            continue
        shapes[t.name] = tuple(int(d) for d in t.shape)  # type: ignore[arg-type]
    if missing:
        example = []
        for t in inputs:
            if t.name in shapes:
                continue
            s = (suggestion or {}).get(t.name) or tuple(
                int(d) if isinstance(d, int) and d > 0 else (1 if i == 0 else 640) for i, d in enumerate(t.shape))
            example.append(f"{t.name}:{'x'.join(map(str, s))}")
        raise ShapeError("; ".join(missing) + f": give their sizes with --shapes {','.join(example)} "
                         "(trtexec's spelling)")
    return shapes, notes


def generate_inputs(specs: Sequence[TensorSpec], shapes: Shapes, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """`count` distinct input sets: floats uniform in [0, 1), uint8 0..255, integers and
    booleans zero (index-like inputs: zero is always in range)."""
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(max(1, count)):
        feeds: dict[str, Any] = {}
        for t in specs:
            shape, dtype = shapes[t.name], np.dtype(t.dtype)
            if dtype.kind == "f":
                feeds[t.name] = rng.uniform(0, 1, shape).astype(dtype)
            elif dtype == np.uint8:
                feeds[t.name] = rng.integers(0, 256, shape, dtype=np.uint8)
            else:
                feeds[t.name] = np.zeros(shape, dtype=dtype)
        sets.append(feeds)
    return sets


def _declared_inputs(model: Path) -> list[TensorSpec] | None:
    """The ONNX file's inputs before any runtime loads it (so a TensorRT build has its shapes)."""
    if model.suffix.lower() != ".onnx":
        return None
    from engines.onnxfacts import read_facts

    facts = read_facts(model)
    return [TensorSpec(t.name, t.shape, t.dtype) for t in facts.inputs]


def _imgsz_suggestion(model: Path, specs: Sequence[TensorSpec]) -> dict[str, tuple[int, ...]]:
    """With Ultralytics metadata, the shape the model was exported for."""
    from engines.onnxfacts import read_facts_quietly

    facts = read_facts_quietly(model)
    if facts is None or facts.imgsz is None or len(specs) != 1 or len(specs[0].shape) != 4:
        return {}
    h, w = facts.imgsz
    return {specs[0].name: (1, 3, h, w)}


def open_raw_backend(opts: RawBenchOptions, shapes: Shapes, scratch: Path) -> tuple[Backend, dict[str, float]]:
    """The backend for the loop, and its timings: load_s (and build_s for a TensorRT build)."""
    options = BackendOptions(threads=opts.threads, graph_optimization=opts.graph_optimization)
    timings: dict[str, float] = {}
    path = opts.model
    if opts.backend == "tensorrt" and path.suffix.lower() == ".onnx":
        from calibration.build import DEFAULT_LAUNCHER, build_in_child
        from engines.trt_build import BuildRequest

        plan = scratch / f"{path.stem}.fp32.plan"
        dynamic = {t.name for t in _declared_inputs(path) or () if not all(isinstance(d, int) and d > 0
                                                                          for d in t.shape)}
        request = BuildRequest(precision="fp32",
                               profile_shapes={n: (s, s, s) for n, s in shapes.items() if n in dynamic} or None)
        t0 = time.perf_counter()
        build_in_child(path, plan, request, launcher=opts.build_launcher or DEFAULT_LAUNCHER)
        timings["build_s"] = round(time.perf_counter() - t0, 3)
        path = plan
    t0 = time.perf_counter()
    backend = open_backend(opts.backend, path, options)
    timings["load_s"] = round(time.perf_counter() - t0, 3)
    return backend, timings


def run_raw_bench(opts: RawBenchOptions) -> dict[str, Any]:
    if not opts.model.is_file():
        raise JetagentError(f"model file not found: {opts.model}")
    given = parse_shapes(opts.shapes) if opts.shapes else None
    declared = _declared_inputs(opts.model)
    shapes: Shapes = {}
    if declared is not None:
        shapes, notes = resolve_shapes(declared, given, _imgsz_suggestion(opts.model, declared))
        opts.notes += notes
    with tempfile.TemporaryDirectory(prefix="jetagent-bench-") as scratch:
        backend, timings = open_raw_backend(opts, shapes, Path(scratch))
        try:
            if declared is None:
                shapes, notes = resolve_shapes(backend.inputs, given)
                opts.notes += notes
            return _loop(opts, backend, shapes, timings)
        finally:
            backend.close()


def _loop(opts: RawBenchOptions, backend: Backend, shapes: Shapes, timings: dict[str, float]) -> dict[str, Any]:
    sets = generate_inputs(backend.inputs, shapes, opts.inputs)
    shown = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in shapes.items())
    try:
        outputs = backend.infer(sets[0])
    except InferenceError as exc:
        raise ModelMismatch(f"{opts.model.name} does not run on generated inputs ({shown}): {exc}") from None
    for i in range(max(0, opts.warmup - 1)):
        backend.infer(sets[i % len(sets)])
    latency = Histogram()
    fps: list[float] = []
    rounds = max(1, opts.rounds)
    for _ in range(rounds):
        n, i = 0, 0
        start = now = time.perf_counter()
        deadline = start + opts.duration_s / rounds
        while now < deadline:
            t0 = time.perf_counter()
            backend.infer(sets[i])
            now = time.perf_counter()
            latency.record(now - t0)
            n += 1
            i = (i + 1) % len(sets)
        fps.append(n / (now - start))
    batch = min((s[0] for s in shapes.values() if s), default=1)
    described = dict(backend.describe())  # ONNX Runtime says backend/version, TensorRT runtime/tensorrt_version
    described.setdefault("backend", backend.name)
    described.setdefault("version", described.get("tensorrt_version"))
    median_fps = round(float(np.median(fps)), 2)
    return {
        "model": str(opts.model), "model_name": opts.model.stem, "sha256": sha256_file(opts.model),
        "mode": "raw", "card": None, "backend": described, "precision": backend.precision,
        "threads": opts.threads, "video": None,
        "inputs": {t.name: {"shape": list(shapes[t.name]), "dtype": t.dtype} for t in backend.inputs},
        "outputs": {n: list(np.shape(v)) for n, v in outputs.items()},
        "notes": list(opts.notes), "duration_s": opts.duration_s, "rounds": rounds, **timings,
        "raw": {"fps": median_fps, "fps_rounds": [round(f, 2) for f in fps],
                "latency_ms": latency.summary_ms((50, 90, 99))},
        "throughput": {"inferences_per_s": median_fps, "batch": int(batch),
                       "samples_per_s": round(median_fps * batch, 2)},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
