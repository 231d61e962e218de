"""Deploy-report bookkeeping: the one owner of what the fleet was last told about a job.

Each transition is checked against the state machine (agent.wire.deploy), carries what
earlier states of the same job learnt (model name, precision, calibration summary,
download numbers), is handed to the publisher (retained on {p}/dev/{id}/deploy), and a
job's final outcome is recorded in the slots file, so a restarted agent does not run a
finished job again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from agent.delivery.slots import Slots
from agent.wire import deploy as S
from agent.wire.core import now
from agent.wire.desired import Desired

log = logging.getLogger(__name__)

Publish = Callable[[dict[str, Any]], None]
# What one state says about itself only; a later state does not repeat it.
NOT_CARRIED = ("reason", "progress", "step")


class DeployReports:
    """What the fleet knows of the current job. Used by the updater's worker thread only."""

    def __init__(self, publish: Publish, slots: Slots) -> None:
        self._publish = publish
        self._slots = slots
        self._last: dict[str, Any] = {}

    @property
    def last(self) -> dict[str, Any]:
        """A copy of the newest deploy state sent (empty before the first job)."""
        return dict(self._last)

    @property
    def state(self) -> str | None:
        return self._last.get("state")

    def begin(self) -> None:
        """A new job: nothing of the previous one is carried into it."""
        self._last = {}

    def transition(self, job: Desired, state: str, **fields: Any) -> None:
        """Move `job` to `state` (TransitionError if the machine does not allow it) and report it."""
        prev = self._last.get("state") if self._last.get("job") == job.job else None
        S.check_transition(prev, state)
        msg = S.deploy_message(job.job, state, job.sha256, **fields)
        if prev is not None:
            msg = {**{k: v for k, v in self._last.items() if k not in NOT_CARRIED}, **msg}
        self._send(msg)
        log.info("deploy %s: %s%s", job.job, state, f" ({fields['reason']})" if fields.get("reason") else "")
        if state in (S.ACTIVE, S.ROLLED_BACK) or (state == S.FAILED and not fields.get("retryable")):
            try:
                self._slots.record_job(job.job, {"state": state, "reason": fields.get("reason", ""), "ts": msg["ts"]})
            except OSError as exc:
                log.error("cannot record the outcome of %s: %s", job.job, exc)

    def progress(self, **fields: Any) -> None:
        """More about the current state (a fraction, a step); not a transition."""
        self._send({**self._last, **fields, "ts": now()})

    def stage(self, job: Desired, state: str, **fields: Any) -> None:
        """From `Host.optimize`: a new state is a transition; the same state again is progress."""
        if self._last.get("state") == state:
            self.progress(**fields)
        else:
            self.transition(job, state, **fields)

    def learn(self, **fields: Any) -> None:
        """Remember something later states carry (a calibration summary, download numbers)."""
        self._last.update(fields)

    def abort(self, job: str, state: str, reason: str) -> None:
        """End a job that a bug interrupted, outside the transition checks (it may be anywhere).
        Nothing is sent if this job already reached a final state."""
        if self._last.get("job") != job or self._last.get("state") in S.TERMINAL:
            return
        msg = {**self._last, "job": job, "state": state, "reason": reason, "ts": now()}
        msg.pop("progress", None)
        self._send(msg)

    def refuse(self, job: str, model: str, reason: str) -> None:
        """A one-off failure that is not a job's run (a rollback with nothing to roll back to)."""
        self._publish(S.deploy_message(job, S.FAILED, model, reason=reason))

    def _send(self, msg: dict[str, Any]) -> None:
        self._last = msg
        self._publish(msg)
