"""The updater: one worker thread that turns desired states into served models.

desired (retained) -> signed manifest -> chunk pull -> verify -> [INT8 calibrate/build/gate]
-> live check -> swap -> probation -> commit, or roll back. Every transition is
reported; any failure before the swap leaves the running model serving and the
store without partial files; after the swap only probation decides.

Runs on its own thread: never on a camera thread, never in an MQTT callback.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from agent import deploy_states as S
from agent.activate import Policy, Probation, live_check
from agent.fetch import Cancelled, Chunk, ChunkSource, Fetcher, FetchError
from agent.manifest import AccuracyBound, Manifest, parse_manifest
from agent.pipeline import CameraPipeline
from agent.protocol import Fields, ProtocolError, now, valid_id
from agent.signing import TrustStore, verify
from agent.slots import Slot, Slots
from agent.store import ModelStore
from engines.errors import JetagentError
from engines.modelcard import ModelCard
from engines.runner import ModelRunner

log = logging.getLogger(__name__)

INBOX_BYTES = 64 * 1024 * 1024  # chunks waiting for the worker, at most
IN_FLIGHT_BYTES = 16 * 1024 * 1024  # chunks requested and not yet arrived, about


class Retryable(JetagentError):
    """A failure of the surroundings (no manifest yet, no model server): reported, but the
    job is not marked done, so the same desired state runs again after a restart."""


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


@dataclass(frozen=True)
class Desired:
    job: str
    sha256: str
    cameras: tuple[str, ...] = ()  # empty = every camera
    precision: str = ""  # "" = the device's configured precision
    policy: Policy = field(default_factory=Policy)
    source: str = "device"

    @classmethod
    def parse(cls, msg: dict[str, Any], source: str = "device") -> Desired:
        f = Fields(msg, "desired")
        pol = Fields(f.obj("policy"), "desired: policy")
        d = Policy()
        policy = Policy(
            probation_s=pol.number("probation_s", d.probation_s, maximum=24 * 3600),
            min_fps=pol.number("min_fps", d.min_fps, maximum=10_000),
            min_fps_ratio=pol.number("min_fps_ratio", d.min_fps_ratio, maximum=1.0),
            max_errors=pol.integer("max_errors", d.max_errors, maximum=10**6),
            stall_s=pol.number("stall_s", d.stall_s, minimum=0.5, maximum=3600),
            check_frames=pol.integer("check_frames", 3, minimum=1, maximum=100),
        )
        cams = msg.get("cameras", [])
        if not isinstance(cams, list) or len(cams) > 64 or not all(isinstance(c, str) and valid_id(c) for c in cams):
            raise ProtocolError("desired: cameras: must be a list of camera names")
        precision = f.text("precision", "", required=False)
        if precision not in ("", "fp32", "fp16", "int8"):
            raise ProtocolError("desired: precision: must be fp32, fp16 or int8")
        return cls(job=f.text("job", max_len=128), sha256=f.sha256("model"), cameras=tuple(cams),
                   precision=precision, policy=policy, source=source)


class Updater:
    def __init__(self, host: Host, store: ModelStore, slots: Slots, trust: TrustStore, transport: Transport,
                 report: Callable[[dict[str, Any]], None], *, default_precision: str = "fp32",
                 fetch_options: dict[str, Any] | None = None, manifest_timeout_s: float = 30.0) -> None:
        self.host, self.store, self.slots, self.trust = host, store, slots, trust
        self.transport, self.report = transport, report
        self.default_precision = default_precision
        self.fetch_options = fetch_options or {}
        self.manifest_timeout_s = manifest_timeout_s
        self.chunks: queue.Queue[Chunk] = queue.Queue(maxsize=64)
        self._active_sha = ""  # chunks of any other model are dropped on arrival
        self.unsolicited_chunks = 0
        # What is asked of the worker: the newest desired state (older ones it never started
        # are superseded) and an operator rollback. Guarded by _cond.
        self._cond = threading.Condition()
        self._pending: Desired | None = None
        self._rollback_reason: str | None = None
        self._rollback_job = ""
        self._cancel = threading.Event()  # the running job's download/calibration should yield
        self._busy: Desired | None = None
        self.last: dict[str, Any] = {}
        self.probations: list[Probation] = []
        self._stopping = False
        self._accuracy = AccuracyBound()
        self._envelope = b""

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
        """paho's thread. Only chunks of the model being downloaded are kept, within a byte
        budget; anything else (a late reply, or replies someone else asked for) is dropped."""
        if chunk.sha256 != self._active_sha:
            self.unsolicited_chunks += 1
            return
        try:
            self.chunks.put_nowait(chunk)
        except queue.Full:  # the worker is behind: the chunk is asked for again after its timeout
            log.debug("chunk inbox full; dropping chunk %d", chunk.index)

    def cancel(self) -> None:
        """Agent shutdown: what runs stops without a verdict. A download keeps its durable
        progress, a job in probation keeps `pending` (ignored at the next start), nothing is
        recorded as done, so the retained desired state runs again after the restart."""
        self._stopping = True
        self._cancel.set()
        with self._cond:
            self._cond.notify_all()

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
            if self.last.get("job") == what and self.last.get("state") not in S.TERMINAL:
                try:
                    self._publish_unchecked(what, state, reason)
                except Exception:
                    log.exception("cannot report the internal error")

    def _publish_unchecked(self, job: str, state: str, reason: str) -> None:
        msg = {**self.last, "job": job, "state": state, "reason": reason, "ts": now()}
        msg.pop("progress", None)
        self.last = msg
        self.report(msg)

    def _publish(self, job: Desired, state: str, **fields: Any) -> None:
        prev = self.last.get("state") if self.last.get("job") == job.job else None
        S.check_transition(prev, state)
        msg = {"v": 1, "job": job.job, "state": state, "model": job.sha256, "ts": now(), **fields}
        if prev is not None:  # carry what earlier states learnt (name, precision, calibration)
            msg = {**{k: v for k, v in self.last.items() if k not in ("reason", "progress", "step")}, **msg}
        self.last = msg
        log.info("deploy %s: %s%s", job.job, state, f" ({fields['reason']})" if fields.get("reason") else "")
        self.report(msg)
        if state in (S.ACTIVE, S.ROLLED_BACK) or (state == S.FAILED and not fields.get("retryable")):
            try:
                self.slots.record_job(job.job, {"state": state, "reason": fields.get("reason", ""), "ts": msg["ts"]})
            except OSError as exc:
                log.error("cannot record the outcome of %s: %s", job.job, exc)

    def _stage(self, job: Desired, state: str, **fields: Any) -> None:
        """From `Host.optimize`: a new state is a transition; the same state again is progress."""
        if self.last.get("state") == state:
            msg = {**self.last, **fields, "ts": now()}
            self.last = msg
            self.report(msg)
        else:
            self._publish(job, state, **fields)

    def _targets(self, job: Desired) -> dict[str, CameraPipeline]:
        pipes = self.host.pipelines()
        if not job.cameras:
            return pipes
        unknown = [c for c in job.cameras if c not in pipes]
        if unknown:
            raise JetagentError(f"no camera named {', '.join(unknown)} on this device "
                                f"(it has {', '.join(pipes)})")
        return {c: pipes[c] for c in job.cameras}

    def _serving(self, job: Desired, targets: dict[str, CameraPipeline]) -> bool:
        want = job.precision
        return all(p.runner.sha256 == job.sha256 and (not want or p.runner.precision == want)
                   for p in targets.values())

    def _deploy(self, job: Desired) -> None:
        done = self.slots.job_outcome(job.job)
        if done is not None:
            # A job seen again (a retained desired state after a restart, or a group's state
            # applying again once the device's own was cleared). An outcome other than
            # "active" stands (push a new job to try again); "active" stands only while the
            # cameras still serve it.
            try:
                serving = self._serving(job, self._targets(job))
            except JetagentError:
                serving = False
            if done.get("state") != S.ACTIVE or serving:
                log.info("deploy %s: already %s", job.job, done.get("state"))
                return
        self.last = {}
        self._publish(job, S.RECEIVED, source=job.source)
        opened: dict[str, ModelRunner] = {}
        try:
            targets = self._targets(job)
            if self._serving(job, targets):
                self._publish(job, S.ACTIVATING)
                self._publish(job, S.ACTIVE, reason="already serving this model",
                              precision=next(iter(targets.values())).runner.precision)
                return
            manifest = self._manifest(job)
            if not self.store.has(job.sha256):
                self._download(job, manifest)
            self._publish(job, S.VERIFYING, name=manifest.name)
            card = manifest.model_card(self.store.model_dir(job.sha256))
            precision = job.precision or self.default_precision
            model_path = str(self.store.model_path(job.sha256))
            summary: dict[str, Any] | None = None
            for i, cam in enumerate(targets):
                if self.host.needs_optimize(precision):
                    # The first camera's run decides (and reports its stages); the others reuse
                    # the stored decision and engine.
                    stage: StageFn = (lambda state, **fields: self._stage(job, state, **fields)) if i == 0 \
                        else (lambda state, **fields: None)
                    opened[cam], summary = self.host.optimize(
                        model_path, card, job.sha256, precision, manifest.accuracy, cam, stage, self._cancel)
                else:
                    opened[cam] = self.host.open_runner(model_path, card, job.sha256, precision)
            if summary is not None:
                self.last["calibration"] = summary
            self._publish(job, S.ACTIVATING, precision=next(iter(opened.values())).precision,
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
            self._publish(job, S.CANCELLED, reason=why)
            return
        except Retryable as exc:
            self._close(opened)
            self._publish(job, S.FAILED, reason=str(exc), retryable=True)
            return
        except JetagentError as exc:
            self._close(opened)
            if self.store.has(job.sha256) and job.sha256 not in self.slots.in_use():
                self.store.remove(job.sha256)  # a model that cannot serve here leaves nothing behind
            self.store.discard(job.sha256)
            self._publish(job, S.FAILED, reason=str(exc))
            return
        except BaseException:
            self._close(opened)
            self.store.discard(job.sha256)
            raise
        self._probation(job, targets, opened)

    def _manifest(self, job: Desired) -> Manifest:
        envelope = self.transport.manifest(job.sha256, self.manifest_timeout_s, self._cancel)
        if self._cancel.is_set():
            raise Cancelled("the deployment was interrupted")
        if envelope is None:
            raise Retryable(f"no manifest for model {job.sha256[:12]} on the broker after "
                            f"{self.manifest_timeout_s:.0f} s (was it pushed?)")
        manifest = parse_manifest(verify(envelope, self.trust))
        self._accuracy = manifest.accuracy
        if manifest.sha256 != job.sha256:
            raise JetagentError(f"the manifest on {job.sha256[:12]}'s topic describes {manifest.sha256[:12]}")
        self._envelope = envelope
        return manifest

    def _download(self, job: Desired, manifest: Manifest) -> None:
        for other in self.store.partials():  # one download at a time: bound the disk it holds
            if other != job.sha256:
                self.store.discard(other)
        download = self.store.begin(manifest, self._envelope)
        self._publish(job, S.DOWNLOADING, name=manifest.name, size=manifest.size, progress=0.0,
                      resumed_chunks=download.resumed_chunks)
        self.chunks = queue.Queue(maxsize=max(8, INBOX_BYTES // manifest.chunk_size))
        self._active_sha = job.sha256

        def progress(done: int, total: int, st: Any) -> None:
            msg = dict(self.last, progress=round(done / total, 3), rejected_chunks=st.rejected, ts=now())
            self.last = msg
            self.report(msg)

        # Keep about 16 MiB requested (16..64 chunks, 8 per request): enough to cover the
        # round trip through the broker and the server at loopback speed.
        window = max(16, min(64, IN_FLIGHT_BYTES // manifest.chunk_size))
        options = {"window": window, "batch": 8, **self.fetch_options}
        fetcher = Fetcher(download, self.transport, self.chunks, progress=progress, **options)
        try:
            fetcher.run(self._cancel)
            download.finish()
        except FetchError as exc:
            download.close()
            if exc.retryable:  # nothing arrived: keep what is durable for the next try
                raise Retryable(str(exc)) from exc
            raise
        except BaseException:
            download.close()
            raise
        finally:
            self._active_sha = ""
        st = fetcher.stats
        self.last.update(download={"seconds": round(st.seconds, 3), "requested": st.requested,
                                   "rejected": st.rejected, "re_requested": st.re_requested,
                                   "mb_per_s": round(st.bytes / 1e6 / max(st.seconds, 1e-9), 1)})

    def _probation(self, job: Desired, targets: dict[str, CameraPipeline], opened: dict[str, ModelRunner]) -> None:
        replaced: dict[str, Slot | None] = {}
        self.probations = []
        for cam, runner in opened.items():
            replaced[cam] = self.slots.active(cam) or _slot_of(targets[cam].runner)
            self.slots.set_pending(cam, self._slot(job, runner))
            self.probations.append(Probation.swap_in(targets[cam], runner, job.policy))
        self._publish(job, S.PROBATION, probation_s=job.policy.probation_s)
        verdicts: dict[str, str] = {}
        while len(verdicts) < len(self.probations):
            if self._stopping:  # shutdown: neither commit nor roll back; the next start serves `active`
                log.info("deploy %s: probation interrupted by shutdown", job.job)
                return
            with self._cond:
                asked, self._rollback_reason = self._rollback_reason, None
            if asked is not None:
                for p in self.probations:
                    p.reason = p.reason or asked
                verdicts = {p.pipeline.name: "fail" for p in self.probations}
                break
            for p in self.probations:
                if p.pipeline.name not in verdicts:
                    v = p.check()
                    if v is not None:
                        verdicts[p.pipeline.name] = v
            if "fail" in verdicts.values():
                break
            with self._cond:
                self._cond.wait(0.1)
        measured = {p.pipeline.name: p.measured() for p in self.probations}
        if "fail" in verdicts.values():
            reasons = [f"{p.pipeline.name}: {p.reason}" for p in self.probations if p.reason]
            for p in self.probations:
                p.rollback()
                self.slots.clear_pending(p.pipeline.name)
            self.probations = []
            self._publish(job, S.ROLLED_BACK, reason="; ".join(reasons), probation=measured)
            return
        for p in self.probations:
            cam = p.pipeline.name
            self.slots.commit(cam, self._slot(job, p.new), replaced[cam])
            p.commit()
        self.probations = []
        self.store.gc(self.slots.in_use())
        self._publish(job, S.ACTIVE, probation=measured)

    def _slot(self, job: Desired, runner: ModelRunner) -> Slot:
        return Slot(job.sha256, runner.card.name, runner.precision, job=job.job,
                    accuracy_min=self._accuracy.minimum, accuracy_metric=self._accuracy.metric)

    def _rollback_committed(self, reason: str) -> None:
        """Operator rollback outside probation: serve each camera's previous slot again,
        opened the way it served (its precision and engine)."""
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
                self.report({"v": 1, "job": job.job, "state": S.FAILED, "model": prev.sha256, "ts": now(),
                             "reason": f"rollback of {cam} failed: {exc}"})
                continue
            pipe.swap(runner).close()
            self.slots.commit(cam, prev, cur)
            swapped.append(cam)
        if not swapped:
            self.report({"v": 1, "job": job.job, "state": S.FAILED, "model": job.sha256, "ts": now(),
                         "reason": "nothing to roll back to: no camera has a previous model stored"})
            return
        self.last = {}
        self._publish(job, S.RECEIVED, source="command", reason=reason)
        self._publish(job, S.ACTIVATING, cameras=swapped)
        self._publish(job, S.ACTIVE, reason=f"rolled back: {reason}")

    @staticmethod
    def _close(runners: dict[str, ModelRunner]) -> None:
        for r in runners.values():
            r.close()

    def status(self) -> dict[str, Any]:
        return dict(self.last)


def _slot_of(runner: ModelRunner) -> Slot:
    return Slot(runner.sha256, runner.card.name, runner.precision, path=runner.path)
