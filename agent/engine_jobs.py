"""Engines made off the start-up path: wait a little, else serve ONNX Runtime and swap in later.

Building a TensorRT engine (or gating INT8) takes minutes on a Jetson; systemd gives the
start `TimeoutStartSec=180`. So when a camera's model needs an engine at start-up (the
bootstrap ONNX with `backend = "tensorrt"`, or a committed INT8/FP16 slot after a JetPack
upgrade invalidated its engine), `StartupEngines.start` runs the deployment on a thread
and waits for it only until the start-up deadline (`[backend] startup_wait_s`, shared by
all cameras). An engine from the cache loads in that time and serves from the first frame;
otherwise the camera starts on ONNX Runtime FP32 of the same model (the gate's reference),
and the engine is swapped in after a live check when it is ready. A job whose camera got
a new model meanwhile (a fleet deployment, a rollback) is superseded: what it makes is
closed, never swapped over the newer model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.wire.desired import Policy
from engines.errors import JetagentError

if TYPE_CHECKING:  # both need cv2; this module does not
    from agent.camera.pipeline import CameraPipeline
    from engines.runner import ModelRunner

log = logging.getLogger(__name__)

# (stage, cancel) -> (runner, deployment summary): the deployment, bound to one model and camera.
Deploy = Callable[[Callable[..., None], threading.Event], "tuple[ModelRunner, dict[str, Any]]"]


class EngineJob:
    """One camera's engine in the making. Its fields are guarded by `lock`."""

    def __init__(self, camera: str, precision: str, what: str) -> None:
        self.camera, self.precision, self.what = camera, precision, what
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.runner: ModelRunner | None = None  # ready before start-up gave up waiting: start-up takes it
        self.interim: ModelRunner | None = None  # what the camera serves meanwhile
        self.state = "building"  # building | serving | failed | superseded
        self.reason = ""
        self.summary: dict[str, Any] = {}
        self.started = time.monotonic()
        self.seconds = 0.0

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {"camera": self.camera, "model": self.what, "precision": self.precision, "state": self.state,
                    "reason": self.reason, "seconds": round(self.seconds or time.monotonic() - self.started, 1),
                    "candidate": self.summary.get("candidate"), "served": self.summary.get("precision")}


def wait_pipeline(pipelines: Callable[[], dict[str, CameraPipeline]], camera: str,
                  cancel: threading.Event) -> CameraPipeline:
    """The camera's pipeline; work started during `Agent.open()` waits here until it exists."""
    while True:
        pipe = pipelines().get(camera)
        if pipe is not None:
            return pipe
        if cancel.wait(0.2):
            from agent.delivery.fetch import Cancelled

            raise Cancelled(f"camera {camera}: stopped before its pipeline started")


class StartupEngines:
    """The engine jobs of one agent, one per camera at most."""

    def __init__(self, pipelines: Callable[[], dict[str, CameraPipeline]], wait_s: float) -> None:
        self._pipelines = pipelines
        self._wait_s = wait_s
        self._deadline: float | None = None  # set by the first start(): one budget for all cameras
        self._lock = threading.Lock()
        self.jobs: dict[str, EngineJob] = {}

    def start(self, camera: str, precision: str, what: str, deploy: Deploy,
              open_interim: Callable[[], ModelRunner]) -> ModelRunner:
        """Start making the engine; return it if ready by the deadline, else `open_interim()` (which then
        serves until the engine is swapped in)."""
        job = EngineJob(camera, precision, what)
        with self._lock:
            old = self.jobs.get(camera)
            if old is not None:
                old.cancel.set()
            self.jobs[camera] = job
        threading.Thread(target=self._run, args=(job, deploy), name=f"engine-{camera}", daemon=True).start()
        if self._deadline is None:
            self._deadline = time.monotonic() + self._wait_s
        job.done.wait(max(0.0, self._deadline - time.monotonic()))
        with job.lock:
            if job.runner is not None:  # ready in time (a cached engine): it serves from the first frame
                runner, job.runner = job.runner, None
                return runner
        try:
            interim = open_interim()
        except BaseException:
            job.cancel.set()  # nothing will take the engine: the job closes it when done
            raise
        with job.lock:
            if job.runner is not None:  # finished while the interim model was opening
                interim.close()
                runner, job.runner = job.runner, None
                return runner
            job.interim = interim
            if job.state == "building":
                log.warning("camera %s: serving %s on ONNX Runtime FP32 while its %s engine is made in the "
                            "background", camera, what, precision)
            else:
                log.error("camera %s: no %s engine for %s (%s); serving ONNX Runtime FP32", camera, precision,
                          what, job.reason)
        return interim

    def _run(self, job: EngineJob, deploy: Deploy) -> None:
        def stage(state: str, **fields: Any) -> None:
            step = fields.get("step")
            with job.lock:
                job.reason = str(step.get("message", "") if isinstance(step, dict) else step or state)[:200]

        try:
            runner, summary = deploy(stage, job.cancel)
        except Exception as exc:  # a JetagentError says why; anything else is a bug, kept in the log
            if not isinstance(exc, JetagentError):
                log.exception("camera %s: making the engine crashed", job.camera)
            with job.lock:
                job.state = "superseded" if job.cancel.is_set() else "failed"
                job.reason, job.seconds = str(exc)[:300], time.monotonic() - job.started
                serving_interim = job.interim is not None and job.state == "failed"
            if serving_interim:
                log.error("camera %s: no %s engine for %s (%s); ONNX Runtime FP32 keeps serving", job.camera,
                          job.precision, job.what, exc)
            job.done.set()
            return
        with job.lock:
            job.summary, job.seconds = dict(summary), time.monotonic() - job.started
            if job.interim is None and not job.cancel.is_set():
                job.runner, job.state = runner, "serving"  # start-up is still waiting: it takes this one
                job.reason = str(summary.get("reason", ""))[:300]
                job.done.set()
                return
        self._swap_in(job, runner)
        job.done.set()

    def _swap_in(self, job: EngineJob, runner: ModelRunner) -> None:
        """Put a finished engine in place of the interim runner, after a live check; or close it."""
        from agent.delivery.activate import ActivationError, live_check

        try:
            pipe = wait_pipeline(self._pipelines, job.camera, job.cancel)
            live_check(pipe, runner, Policy())
        except (ActivationError, JetagentError) as exc:
            runner.close()
            with job.lock:
                job.state, job.reason = ("superseded" if job.cancel.is_set() else "failed"), str(exc)[:300]
            log.error("camera %s: the %s engine for %s was not swapped in: %s", job.camera, job.precision,
                      job.what, exc)
            return
        with self._lock, job.lock:
            current = self.jobs.get(job.camera) is job and not job.cancel.is_set() and pipe.runner is job.interim
            old = pipe.swap(runner) if current else None
            job.state, job.interim = ("serving", None) if current else ("superseded", job.interim)
            if current:
                job.reason = str(job.summary.get("reason", ""))[:300]
        if old is None:
            runner.close()
            log.info("camera %s: the engine for %s finished after something else replaced the model; closed it",
                     job.camera, job.what)
            return
        old.close()
        log.info("camera %s: %s engine for %s serves now (made in %.0f s; ONNX Runtime served meanwhile)",
                 job.camera, runner.precision, job.what, job.seconds)

    def supersede(self, camera: str | None, reason: str) -> None:
        """Something replaces a camera's model (None: every camera's): its engine job is moot."""
        with self._lock:
            jobs = [j for name, j in self.jobs.items() if camera is None or name == camera]
        for job in jobs:
            with job.lock:
                if job.state == "building":
                    job.state, job.reason = "superseded", reason
            job.cancel.set()

    def status(self) -> list[dict[str, Any]]:
        """Each camera's engine job: building, serving, failed or superseded, and why."""
        with self._lock:
            jobs = list(self.jobs.values())
        return [job.status() for job in jobs]

    def close(self, timeout: float = 5.0) -> None:
        """Stop waiting for engines; a job that finishes later closes what it made."""
        with self._lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            job.cancel.set()
        deadline = time.monotonic() + timeout
        for job in jobs:
            job.done.wait(max(0.0, deadline - time.monotonic()))
