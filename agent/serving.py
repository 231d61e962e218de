"""How the agent opens the models it serves: the updater's `Host`, and the model each
camera starts with (its committed slot, else the config's bootstrap model).

FP32 on ONNX Runtime is a plain load. Anything else (INT8, FP16, TensorRT) goes
through `calibration.deploy.deploy_model` with a calibration set from this camera:
the stored one for the model's input spec, or a fresh one collected by a frame
reservoir riding on the running camera loop.

Start-up never builds in the foreground. When a camera's model needs an engine (the
bootstrap ONNX with `backend = "tensorrt"`, or a committed INT8/FP16 slot), the same
deployment path runs on a background thread (`agent.engine_jobs`); start-up waits for it
at most `[backend] startup_wait_s` in all (an engine in the cache loads in seconds), and
otherwise the camera starts on ONNX Runtime FP32 of the same model and the engine is
swapped in, after a live check, when it is ready. So a JetPack upgrade that invalidates
every engine, or a first start that builds for minutes, never runs past systemd's
TimeoutStartSec. A fleet deployment (or rollback) for a camera supersedes its job.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.camera.pipeline import CameraPipeline
from agent.config import CameraConfig, Config
from agent.delivery.slots import Slot, Slots
from agent.delivery.store import ModelStore
from agent.delivery.updater import StageFn
from agent.engine_jobs import StartupEngines, wait_pipeline
from agent.wire import deploy as S
from agent.wire.manifest import AccuracyBound
from engines.base import BackendOptions
from engines.errors import JetagentError
from engines.modelcard import InputSpec, ModelCard, card_path_for, load_card
from engines.runner import ModelRunner, file_sha256, open_model

log = logging.getLogger(__name__)

ENGINE_CACHE_ENTRIES = 24  # about the last five deployments' candidates and decisions


def backend_options(config: Config, precision: str | None = None) -> BackendOptions:
    b = config.backend
    return BackendOptions(threads=b.threads, providers=b.providers, graph_optimization=b.graph_optimization,
                          precision=precision or b.precision)


def is_engine_file(path: str | Path) -> bool:
    """True for a TensorRT plan jetagent built (it has its `<plan>.json` sidecar); an ONNX is not."""
    p = Path(path)
    return p.suffix.lower() != ".onnx" and p.with_name(p.name + ".json").is_file()


def needs_engine(config: Config, model: str | Path) -> bool:
    """With backend = "tensorrt", a model that is not yet a plan needs an engine built from it."""
    return config.backend.name == "tensorrt" and not is_engine_file(model)


def open_camera_model(config: Config, cam: CameraConfig) -> ModelRunner:
    """The model the config names for a camera (its bootstrap model), at FP32, checked with one
    real inference on a generated frame (engines.modelcheck): a card whose size the model
    cannot run (a stride-32 model at 300x300) fails here, at --check-config and start-up,
    not on every camera frame. An ONNX model with backend = "tensorrt" opens on ONNX Runtime
    here: the engine is built from it by `Serving` (agent.engine_jobs)."""
    from engines.modelcheck import check_model

    backend = "onnxruntime" if needs_engine(config, cam.model) else config.backend.name
    runner = open_model(cam.model, card=cam.card, backend=backend, options=backend_options(config, "fp32"))
    try:
        check_model(runner)
    except JetagentError as exc:
        runner.close()
        raise JetagentError(f"camera {cam.name}: {exc}") from None
    return runner


def apply_cuda_choice(choice: str) -> None:
    """`[backend] cuda_memory` for this process and the build children it starts (through the environment)."""
    from engines.cuda_mem import ENV_VAR

    if choice and choice != "auto":
        os.environ[ENV_VAR] = choice


class Serving:
    """Implements `agent.delivery.updater.Host` for the daemon."""

    def __init__(self, config: Config, pipelines: Callable[[], dict[str, CameraPipeline]],
                 store: ModelStore | None = None, slots: Slots | None = None) -> None:
        self.config = config
        self._pipelines = pipelines
        self.store = store
        self.slots = slots
        self.engines = StartupEngines(pipelines, config.backend.startup_wait_s)
        apply_cuda_choice(config.backend.cuda_memory)

    # -- Host ---------------------------------------------------------------------------------
    def pipelines(self) -> dict[str, CameraPipeline]:
        return self._pipelines()

    def open_runner(self, model_path: str, card: ModelCard, sha256: str, precision: str) -> ModelRunner:
        self.engines.supersede(None, "a fleet deployment replaced the start-up model")
        return open_model(model_path, card=card, backend=self.config.backend.name, sha256=sha256,
                          options=backend_options(self.config, "fp32"))

    def needs_optimize(self, precision: str) -> bool:
        return precision != "fp32" or self.config.backend.name != "onnxruntime"

    def optimize(self, model_path: str, card: ModelCard, sha256: str, precision: str, accuracy: AccuracyBound,
                 camera: str, stage: StageFn, cancel: threading.Event, *, collect: bool = True,
                 ) -> tuple[ModelRunner, dict[str, Any]]:
        self.engines.supersede(camera, "a fleet deployment replaced the start-up model")
        return self._optimize(model_path, card, sha256, precision, accuracy, camera, stage, cancel, collect=collect)

    def _optimize(self, model_path: str, card: ModelCard, sha256: str, precision: str, accuracy: AccuracyBound,
                  camera: str, stage: StageFn, cancel: threading.Event, *, collect: bool = True,
                  ) -> tuple[ModelRunner, dict[str, Any]]:
        from calibration.deploy import DeployConfig, deploy_model

        dataset = None
        if precision in ("int8", "fp16"):
            dataset = self._calibration_set(card.input, camera, stage, cancel, collect)
        stage(S.BUILDING, step="preparing candidates")
        config = DeployConfig.from_backend(self.config.backend, precision=precision)
        deployment = deploy_model(
            model_path, card, dataset, config, accuracy, state_dir=self.config.state_dir, model_sha256=sha256,
            progress=lambda ev: stage(S.BUILDING, step=ev.to_dict()))
        stage(S.VALIDATING, calibration=deployment.summary)
        self._prune_engines(keep_also=Path(deployment.engine_path))
        return deployment.runner, deployment.summary

    def _prune_engines(self, keep_also: Path) -> None:
        """Bound the engine cache's disk: the most recent entries, and never one in use."""
        from calibration.engine_cache import EngineCache

        root = self.config.state_dir / "engines"
        in_use = {keep_also.parent.name}
        for pipe in self.pipelines().values():
            p = Path(pipe.runner.path)
            if root in p.parents:
                in_use.add(p.relative_to(root).parts[0])
        removed = EngineCache(root).prune(keep=ENGINE_CACHE_ENTRIES, protect=in_use)
        if removed:
            log.info("engine cache: removed %d old entries", len(removed))

    # -- calibration sets ---------------------------------------------------------------------
    def _calibration_set(self, spec: InputSpec, camera: str, stage: StageFn, cancel: threading.Event,
                         collect: bool) -> Any:
        from calibration.dataset import CalibrationStore
        from calibration.errors import CalibrationError

        store = CalibrationStore(self.config.state_dir / "calibration")
        try:
            stored = store.latest(spec)
        except CalibrationError as exc:
            log.warning("stored calibration set unusable (%s); collecting a new one", exc)
            stored = None
        if stored is not None:
            stage(S.CALIBRATING, step=f"stored calibration set {stored.content_hash[:12]}",
                  samples=list(stored.size))
            return stored
        if not collect:
            raise JetagentError("no stored calibration set for this model's input")
        dataset = self.collect(camera, spec, stage, cancel)
        store.save(dataset)
        return dataset

    def collect(self, camera: str, spec: InputSpec, stage: StageFn, cancel: threading.Event) -> Any:
        """A calibration set from the live camera: a reservoir rides on the loop until full."""
        from calibration.reservoir import FrameReservoir

        c = self.config.calibration
        pipe = wait_pipeline(self.pipelines, camera, cancel)
        reservoir = FrameReservoir(spec, calibration_size=c.frames, holdout_size=c.holdout,
                                   min_interval_s=c.min_interval_s, camera=camera)
        reservoir.start()
        pipe.observers.append(reservoir)
        deadline = time.monotonic() + c.collect_timeout_s
        stage(S.CALIBRATING, step="collecting frames from the camera", progress=0.0)
        try:
            while not reservoir.full and time.monotonic() < deadline and not cancel.is_set():
                time.sleep(0.5)
                kept = sum(reservoir.counts())
                stage(S.CALIBRATING, progress=round(kept / (c.frames + c.holdout), 3))
        finally:
            pipe.remove_observer(reservoir)
            reservoir.stop()
        if cancel.is_set():
            from agent.delivery.fetch import Cancelled

            raise Cancelled("a newer deployment replaced this one")
        return reservoir.snapshot(min_calibration=c.min_frames, min_holdout=max(1, c.min_frames // 4))

    # -- what each camera starts with ---------------------------------------------------------
    def initial_runner(self, cam: CameraConfig) -> ModelRunner:
        """The committed model of this camera's slot (last-known-good), else the bootstrap model.

        Whatever needs an engine is made by an `EngineJob`; this waits for it only until the
        start-up deadline and otherwise returns ONNX Runtime FP32 of the same model.
        """
        if self.slots is not None:
            self.slots.clear_pending(cam.name)  # a model still on probation at the power cut never serves
            slot = self.slots.active(cam.name)
            if slot is not None:
                try:
                    return self._open_slot_at_start(slot, cam.name)
                except JetagentError as exc:
                    log.error("camera %s: cannot serve its committed model %s (%s); serving the config's "
                              "model %s instead", cam.name, slot.sha256[:12], exc, cam.model)
        if needs_engine(self.config, cam.model):
            card = load_card(cam.card or card_path_for(cam.model))
            return self._engine_at_start(cam.name, cam.model, card, file_sha256(cam.model),
                                         self.config.backend.precision, AccuracyBound(), collect=True)
        return open_camera_model(self.config, cam)

    def _slot_files(self, slot: Slot) -> tuple[Path, ModelCard]:
        if self.store is not None and self.store.has(slot.sha256):
            model, card_file = self.store.model_path(slot.sha256), self.store.card_path(slot.sha256)
        elif slot.path and Path(slot.path).is_file():
            model, card_file = Path(slot.path), card_path_for(slot.path)
        else:
            raise JetagentError(f"model {slot.sha256[:12]} is neither in the store nor at {slot.path!r}")
        return model, load_card(card_file)

    def _open_slot_at_start(self, slot: Slot, camera: str) -> ModelRunner:
        model, card = self._slot_files(slot)
        if not self.needs_optimize(slot.precision):
            return open_model(model, card=card, backend=self.config.backend.name, sha256=slot.sha256,
                              options=backend_options(self.config, "fp32"))
        bound = AccuracyBound(slot.accuracy_min, slot.accuracy_metric)
        return self._engine_at_start(camera, model, card, slot.sha256, slot.precision, bound, collect=False)

    def open_slot(self, slot: Slot, camera: str) -> ModelRunner:
        """Open a slot's model the way it served (the updater's rollback): the stored decision and
        engine make this a load, not a calibration."""
        self.engines.supersede(camera, "a rollback replaced the start-up model")
        model, card = self._slot_files(slot)
        if not self.needs_optimize(slot.precision):
            return self.open_runner(str(model), card, slot.sha256, "fp32")
        bound = AccuracyBound(slot.accuracy_min, slot.accuracy_metric)
        runner, _ = self._optimize(str(model), card, slot.sha256, slot.precision, bound, camera,
                                   lambda state, **fields: None, threading.Event(), collect=False)
        return runner


    # -- engines made off the start-up path (agent.engine_jobs) ------------------------------------
    def _engine_at_start(self, camera: str, model: Path, card: ModelCard, sha256: str, precision: str,
                         bound: AccuracyBound, *, collect: bool) -> ModelRunner:
        def deploy(stage: StageFn, cancel: threading.Event) -> tuple[ModelRunner, dict[str, Any]]:
            return self._optimize(str(model), card, sha256, precision, bound, camera, stage, cancel, collect=collect)

        def interim() -> ModelRunner:
            return open_model(model, card=card, backend="onnxruntime", sha256=sha256,
                              options=backend_options(self.config, "fp32"))

        return self.engines.start(camera, precision, f"{card.name} ({sha256[:12]})", deploy, interim)

    def engine_status(self) -> list[dict[str, Any]]:
        """Each camera's start-up engine job (for `status`): building, serving, failed or superseded."""
        return self.engines.status()

    def close(self) -> None:
        self.engines.close()
