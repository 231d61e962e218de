"""The updater: one worker thread that turns desired states into served models.

desired (retained) -> signed manifest -> chunk pull -> verify -> [INT8 calibrate/build/gate]
-> live check -> swap -> probation -> commit, or roll back. Every transition is
reported; any failure before the swap leaves the running model serving and the
store without partial files; after the swap only probation decides.

Runs on its own thread: never on a camera thread, never in an MQTT callback. What the
deployment reported lives in `DeployReports` (agent/delivery/reports.py), the chunk
inbox and the pull in agent/delivery/pull.py, the probation loop in agent/delivery/activate.py.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from agent.delivery.activate import Probation, live_check, watch
from agent.delivery.fetch import Cancelled, Chunk, ChunkSource, FetchStats, Retryable
from agent.delivery.pull import ChunkInbox, pull
from agent.delivery.reports import DeployReports
from agent.delivery.slots import Slot, Slots
from agent.delivery.store import ModelStore
from agent.wire import deploy as S
from agent.wire.desired import Desired, Policy
from agent.wire.manifest import AccuracyBound, Manifest, parse_manifest
from agent.wire.signing import TrustStore, verify
from engines.errors import JetagentError
from engines.modelcard import ModelCard

if TYPE_CHECKING:  # types only: delivery imports without cv2
    from agent.camera.pipeline import CameraPipeline
    from engines.runner import ModelRunner

log = logging.getLogger(__name__)

__all__ = ["Host", "Retryable", "StageFn", "Transport", "Updater"]


class Transport(ChunkSource, Protocol):
    def manifest(self, sha256: str, timeout: float, cancel: threading.Event) -> bytes | None:
        """The retained signed manifest of a model; None if none arrives in time or `cancel` is set."""


StageFn = Callable[..., None]  # stage(state, **fields): a deploy state (or progress within it)


class Host(Protocol):
    """What the updater needs of the agent."""

    def pipelines(self) -> dict[str, CameraPipeline]: ...

    def open_runner(self, model_path: str, card: ModelCard, sha256: str, precision: str) -> ModelRunner: ...

    def needs_optimize(self, precision: str) -> bool:
        """True when serving `precision` takes calibration/building/gating, not just loading."""

    def optimize(self, model_path: str, card: ModelCard, sha256: str, precision: str, accuracy: AccuracyBound,
                 camera: str, stage: StageFn, cancel: threading.Event) -> tuple[ModelRunner, dict[str, Any]]:
        """Calibrate, build, gate; return the runner that serves and a JSON-able summary."""

    def open_slot(self, slot: Slot, camera: str) -> ModelRunner:
        """Open a model a slot names, the way it served (its precision and engine)."""


class Updater:
    def __init__(self, host: Host, store: ModelStore, slots: Slots, trust: TrustStore, transport: Transport,
                 report: Callable[[dict[str, Any]], None], *, default_precision: str = "fp32",
                 fetch_options: dict[str, Any] | None = None, manifest_timeout_s: float = 30.0) -> None:
        self.host, self.store, self.slots, self.trust = host, store, slots, trust
        self.transport = transport
        self.reports = DeployReports(report, slots)
        self.inbox = ChunkInbox()
        self.default_precision = default_precision
        self.fetch_options = fetch_options or {}
        self.manifest_timeout_s = manifest_timeout_s
        # What is asked of the worker: the newest desired state (older ones it never started
        # are superseded) and an operator rollback. Guarded by _cond.
        self._cond = threading.Condition()
        self._pending: Desired | None = None
        self._rollback_reason: str | None = None
        self._rollback_job = ""
        self._cancel = threading.Event()  # the running job's download/calibration should yield
        self._busy: Desired | None = None
        self.probations: list[Probation] = []
        self._stopping = False

    # -- called from other threads (link callbacks, commands): record and return ----------------
    def submit(self, desired: Desired) -> None:
        with self._cond:
            superseded = self._pending
            self._pending = desired
            if self._busy is not None and self._busy.job != desired.job and not self.probations:
                self._cancel.set()  # a download or calibration in progress yields to the newer job
            self._cond.notify_all()
        if superseded is not None and superseded.job != desired.job:
            log.info("deploy %s: superseded by %s before it started", superseded.job, desired.job)

    def request_rollback(self, reason: str = "operator asked for a rollback") -> str:
        """During probation: end it now. Otherwise a job in progress yields and each camera
        serves its previous model again. Returns the id of the job whose outcome answers it."""
        with self._cond:
            self._rollback_reason = reason
            if self.probations and self._busy is not None:
                job = self._busy.job
            else:
                self._rollback_job = f"rollback-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
                job = self._rollback_job
                if self._busy is not None:
                    self._cancel.set()
            self._cond.notify_all()
        return job

    def on_chunk(self, chunk: Chunk) -> None:
        """paho's thread: into the inbox if it belongs to the download in progress."""
        self.inbox.on_chunk(chunk)

    def cancel(self) -> None:
        """Agent shutdown: what runs stops without a verdict. A download keeps its durable
        progress, a job in probation keeps `pending` (ignored at the next start), nothing is
        recorded as done, so the retained desired state runs again after the restart."""
        self._stopping = True
        self._cancel.set()
        with self._cond:
            self._cond.notify_all()

    def status(self) -> dict[str, Any]:
        return self.reports.last

    # -- the worker ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set() and not self._stopping:
            self.run_once(timeout=0.5)

    def run_once(self, timeout: float = 0.5) -> bool:
        with self._cond:
            if self._pending is None and self._rollback_reason is None:
                self._cond.wait(timeout)
            if self._stopping:
                return False
            if self._rollback_reason is not None:
                reason, self._rollback_reason = self._rollback_reason, None
                job: Desired | None = None
            else:
                job, self._pending = self._pending, None
                if job is None:
                    return False
                self._busy = job
                self._cancel.clear()
        try:
            if job is None:
                self._guarded(lambda: self._rollback_committed(reason), "rollback")
            else:
                self._guarded(lambda: self._deploy(job), job.job)
        finally:
            with self._cond:
                self._busy = None
        return True

    def _guarded(self, work: Callable[[], None], what: str) -> None:
        """A bug or an OS error in a job must not kill the worker: the job ends with the reason."""
        try:
            work()
        except Exception as exc:
            log.exception("deploy %s: internal error", what)
            reason = f"internal error: {type(exc).__name__}: {exc}"
            for p in self.probations:  # an unproven model never stays without a watcher
                try:
                    p.reason = reason
                    p.rollback()
                    self.slots.clear_pending(p.pipeline.name)
                except Exception:
                    log.exception("rollback after an internal error failed")
            state = S.ROLLED_BACK if self.probations else S.FAILED
            self.probations = []
            try:
                self.reports.abort(what, state, reason)
            except Exception:
                log.exception("cannot report the internal error")

    # -- one deployment -----------------------------------------------------------------------
    def _deploy(self, job: Desired) -> None:
        if self._done_before(job):
            return
        self.reports.begin()
        self.reports.transition(job, S.RECEIVED, source=job.source)
        opened: dict[str, ModelRunner] = {}
        try:
            targets = self._targets(job)
            if self._serving(job, targets):
                self.reports.transition(job, S.ACTIVATING)
                self.reports.transition(job, S.ACTIVE, reason="already serving this model",
                                        precision=next(iter(targets.values())).runner.precision)
                return
            manifest, envelope = self._manifest(job)
            if not self.store.has(job.sha256):
                self._download(job, manifest, envelope)
            self.reports.transition(job, S.VERIFYING, name=manifest.name)
            opened = self._open(job, manifest, targets)
            self.reports.transition(job, S.ACTIVATING, precision=next(iter(opened.values())).precision,
                                    cameras=sorted(targets))
            for cam, runner in opened.items():
                live_check(targets[cam], runner, job.policy)
        except Cancelled as exc:
            self._close(opened)
            if self._stopping:  # shutdown: no verdict; the durable download resumes after the restart
                log.info("deploy %s: interrupted by shutdown", job.job)
                return
            with self._cond:
                why = "an operator rollback" if self._rollback_reason is not None else str(exc)
            self.reports.transition(job, S.CANCELLED, reason=why)
            return
        except Retryable as exc:
            self._close(opened)
            self.reports.transition(job, S.FAILED, reason=str(exc), retryable=True)
            return
        except JetagentError as exc:
            self._close(opened)
            if self.store.has(job.sha256) and job.sha256 not in self.slots.in_use():
                self.store.remove(job.sha256)  # a model that cannot serve here leaves nothing behind
            self.store.discard(job.sha256)
            self.reports.transition(job, S.FAILED, reason=str(exc))
            return
        except BaseException:
            self._close(opened)
            self.store.discard(job.sha256)
            raise
        self._probation(job, targets, opened, manifest.accuracy)

    def _done_before(self, job: Desired) -> bool:
        """A job seen again (a retained desired state after a restart, or a group's state
        applying again once the device's own was cleared). An outcome other than "active"
        stands (push a new job to try again); "active" stands only while the cameras still
        serve it."""
        done = self.slots.job_outcome(job.job)
        if done is None:
            return False
        try:
            serving = self._serving(job, self._targets(job))
        except JetagentError:
            serving = False
        if done.get("state") != S.ACTIVE or serving:
            log.info("deploy %s: already %s", job.job, done.get("state"))
            return True
        return False

    def _targets(self, job: Desired) -> dict[str, CameraPipeline]:
        pipes = self.host.pipelines()
        if not job.cameras:
            return pipes
        unknown = [c for c in job.cameras if c not in pipes]
        if unknown:
            raise JetagentError(f"no camera named {', '.join(unknown)} on this device "
                                f"(it has {', '.join(pipes)})")
        return {c: pipes[c] for c in job.cameras}

    @staticmethod
    def _serving(job: Desired, targets: dict[str, CameraPipeline]) -> bool:
        want = job.precision
        return all(p.runner.sha256 == job.sha256 and (not want or p.runner.precision == want)
                   for p in targets.values())

    def _manifest(self, job: Desired) -> tuple[Manifest, bytes]:
        envelope = self.transport.manifest(job.sha256, self.manifest_timeout_s, self._cancel)
        if self._cancel.is_set():
            raise Cancelled("the deployment was interrupted")
        if envelope is None:
            raise Retryable(f"no manifest for model {job.sha256[:12]} on the broker after "
                            f"{self.manifest_timeout_s:.0f} s (was it pushed?)")
        manifest = parse_manifest(verify(envelope, self.trust))
        if manifest.sha256 != job.sha256:
            raise JetagentError(f"the manifest on {job.sha256[:12]}'s topic describes {manifest.sha256[:12]}")
        return manifest, envelope

    def _download(self, job: Desired, manifest: Manifest, envelope: bytes) -> None:
        for other in self.store.partials():  # one download at a time: bound the disk it holds
            if other != job.sha256:
                self.store.discard(other)
        download = self.store.begin(manifest, envelope)
        self.reports.transition(job, S.DOWNLOADING, name=manifest.name, size=manifest.size, progress=0.0,
                                resumed_chunks=download.resumed_chunks)

        def progress(done: int, total: int, st: FetchStats) -> None:
            self.reports.progress(progress=round(done / total, 3), rejected_chunks=st.rejected)

        st = pull(download, self.transport, self.inbox, self._cancel, progress=progress, options=self.fetch_options)
        self.reports.learn(download={"seconds": round(st.seconds, 3), "requested": st.requested,
                                     "rejected": st.rejected, "re_requested": st.re_requested,
                                     "mb_per_s": round(st.bytes / 1e6 / max(st.seconds, 1e-9), 1)})

    def _open(self, job: Desired, manifest: Manifest, targets: dict[str, CameraPipeline]) -> dict[str, ModelRunner]:
        """A runner per target camera, at the precision asked for. The first camera's
        optimization decides (and reports its stages); the others reuse the stored
        decision and engine. On failure, what was opened is closed."""
        card = manifest.model_card(self.store.model_dir(job.sha256))
        precision = job.precision or self.default_precision
        model_path = str(self.store.model_path(job.sha256))
        opened: dict[str, ModelRunner] = {}
        summary: dict[str, Any] | None = None
        try:
            for i, cam in enumerate(targets):
                if self.host.needs_optimize(precision):
                    stage: StageFn = (lambda state, **fields: self.reports.stage(job, state, **fields)) if i == 0 \
                        else (lambda state, **fields: None)
                    opened[cam], summary = self.host.optimize(
                        model_path, card, job.sha256, precision, manifest.accuracy, cam, stage, self._cancel)
                else:
                    opened[cam] = self.host.open_runner(model_path, card, job.sha256, precision)
        except BaseException:
            self._close(opened)
            raise
        if summary is not None:
            self.reports.learn(calibration=summary)
        return opened

    def _probation(self, job: Desired, targets: dict[str, CameraPipeline], opened: dict[str, ModelRunner],
                   accuracy: AccuracyBound) -> None:
        replaced: dict[str, Slot | None] = {}
        self.probations = []
        for cam, runner in opened.items():
            replaced[cam] = self.slots.active(cam) or _slot_of(targets[cam].runner)
            self.slots.set_pending(cam, _slot(job, runner, accuracy))
            self.probations.append(Probation.swap_in(targets[cam], runner, job.policy))
        self.reports.transition(job, S.PROBATION, probation_s=job.policy.probation_s)
        verdict = watch(self.probations, stopping=lambda: self._stopping, rollback_asked=self._take_rollback,
                        wait=self._wait)
        if verdict.outcome == "stopped":  # shutdown: neither commit nor roll back; the next start serves `active`
            log.info("deploy %s: probation interrupted by shutdown", job.job)
            return
        if verdict.outcome == "fail":
            for p in self.probations:
                p.rollback()
                self.slots.clear_pending(p.pipeline.name)
            self.probations = []
            self.reports.transition(job, S.ROLLED_BACK, reason="; ".join(verdict.reasons), probation=verdict.measured)
            return
        for p in self.probations:
            cam = p.pipeline.name
            self.slots.commit(cam, _slot(job, p.new, accuracy), replaced[cam])
            p.commit()
        self.probations = []
        self.store.gc(self.slots.in_use())
        self.reports.transition(job, S.ACTIVE, probation=verdict.measured)

    def _take_rollback(self) -> str | None:
        with self._cond:
            asked, self._rollback_reason = self._rollback_reason, None
        return asked

    def _wait(self, seconds: float) -> None:
        with self._cond:
            self._cond.wait(seconds)

    # -- operator rollback outside probation ----------------------------------------------------
    def _rollback_committed(self, reason: str) -> None:
        """Serve each camera's previous slot again, opened the way it served (its precision and engine)."""
        pipes = self.host.pipelines()
        job = Desired(job=self._rollback_job or f"rollback-{uuid.uuid4().hex[:8]}", sha256="0" * 64,
                      source="command")
        swapped = []
        for cam, pipe in pipes.items():
            prev, cur = self.slots.previous(cam), self.slots.active(cam) or _slot_of(pipe.runner)
            if prev is None:
                continue
            job = replace(job, sha256=prev.sha256)
            try:
                runner = self.host.open_slot(prev, cam)
                live_check(pipe, runner, Policy())
            except JetagentError as exc:
                self.reports.refuse(job.job, prev.sha256, f"rollback of {cam} failed: {exc}")
                continue
            pipe.swap(runner).close()
            self.slots.commit(cam, prev, cur)
            swapped.append(cam)
        if not swapped:
            self.reports.refuse(job.job, job.sha256, "nothing to roll back to: no camera has a previous model stored")
            return
        self.reports.begin()
        self.reports.transition(job, S.RECEIVED, source="command", reason=reason)
        self.reports.transition(job, S.ACTIVATING, cameras=swapped)
        self.reports.transition(job, S.ACTIVE, reason=f"rolled back: {reason}")

    @staticmethod
    def _close(runners: dict[str, ModelRunner]) -> None:
        for r in runners.values():
            r.close()


def _slot(job: Desired, runner: ModelRunner, accuracy: AccuracyBound) -> Slot:
    return Slot(job.sha256, runner.card.name, runner.precision, job=job.job,
                accuracy_min=accuracy.minimum, accuracy_metric=accuracy.metric)


def _slot_of(runner: ModelRunner) -> Slot:
    return Slot(runner.sha256, runner.card.name, runner.precision, path=runner.path)
