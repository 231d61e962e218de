"""Which model each camera serves, persisted so a restart comes up on a consistent model.

    {"cameras": {"front": {"active": Slot, "previous": Slot | null, "pending": Slot | null}},
     "jobs": {"<job id>": {"state": "active" | "failed" | ..., "reason": "..."}}}

`pending` is written before a swap and cleared at commit or rollback: if the
power goes while a model is on probation, the next start serves `active`, the
last model that passed probation (last-known-good), never the unproven one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engines.fileio import atomic_write_json, read_json

MAX_JOBS = 64

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slot:
    sha256: str
    name: str
    precision: str = "fp32"
    engine: str = ""  # path of the engine/QDQ model actually served, "" = the model itself
    job: str = ""
    path: str = ""  # for a model outside the store (the config's bootstrap model): its file
    accuracy_min: float = 0.95  # the bound it was gated with (reopening reuses that decision)
    accuracy_metric: str = "auto"

    @classmethod
    def from_dict(cls, d: Any) -> Slot | None:
        if not isinstance(d, dict) or not isinstance(d.get("sha256"), str):
            return None
        if not isinstance(d.get("accuracy_min", 0.95), (int, float)):
            return None
        return cls(sha256=d["sha256"], name=str(d.get("name", "")), precision=str(d.get("precision", "fp32")),
                   engine=str(d.get("engine", "")), job=str(d.get("job", "")), path=str(d.get("path", "")),
                   accuracy_min=float(d.get("accuracy_min", 0.95)),
                   accuracy_metric=str(d.get("accuracy_metric", "auto")))


class Slots:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            raw = read_json(self.path, {}) or {}
        except (OSError, ValueError) as exc:
            # A damaged slots file must not keep the cameras dark: keep it for a look,
            # and start from the config's models.
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            log.error("%s is unreadable (%s); moved to %s, starting from the config's models",
                      self.path, exc, aside)
            try:
                os.replace(self.path, aside)
            except OSError:
                pass
            raw = {}
        self._cameras: dict[str, dict[str, Any]] = raw.get("cameras", {}) if isinstance(raw, dict) else {}
        self._jobs: dict[str, dict[str, Any]] = raw.get("jobs", {}) if isinstance(raw, dict) else {}

    def _save(self) -> None:
        if len(self._jobs) > MAX_JOBS:  # dicts keep insertion order: drop the oldest
            for k in list(self._jobs)[: len(self._jobs) - MAX_JOBS]:
                del self._jobs[k]
        atomic_write_json(self.path, {"cameras": self._cameras, "jobs": self._jobs})

    def _get(self, camera: str, which: str) -> Slot | None:
        return Slot.from_dict(self._cameras.get(camera, {}).get(which))

    def active(self, camera: str) -> Slot | None:
        with self._lock:
            return self._get(camera, "active")

    def previous(self, camera: str) -> Slot | None:
        with self._lock:
            return self._get(camera, "previous")

    def pending(self, camera: str) -> Slot | None:
        with self._lock:
            return self._get(camera, "pending")

    def set_pending(self, camera: str, slot: Slot) -> None:
        with self._lock:
            self._cameras.setdefault(camera, {})["pending"] = asdict(slot)
            self._save()

    def commit(self, camera: str, slot: Slot, replaced: Slot | None) -> None:
        """`slot` passed probation: it becomes active, what it replaced the rollback slot."""
        with self._lock:
            cam = self._cameras.setdefault(camera, {})
            cam["active"] = asdict(slot)
            cam["previous"] = asdict(replaced) if replaced is not None and replaced.sha256 != slot.sha256 \
                else cam.get("previous")
            cam["pending"] = None
            self._save()

    def clear_pending(self, camera: str) -> None:
        with self._lock:
            if self._cameras.get(camera, {}).get("pending") is not None:
                self._cameras[camera]["pending"] = None
                self._save()

    def in_use(self) -> set[str]:
        """Every sha256 a slot names: what garbage collection must keep."""
        with self._lock:
            out = set()
            for cam in self._cameras.values():
                for which in ("active", "previous", "pending"):
                    s = Slot.from_dict(cam.get(which))
                    if s is not None:
                        out.add(s.sha256)
            return out

    def job_outcome(self, job: str) -> dict[str, Any] | None:
        with self._lock:
            return self._jobs.get(job)

    def record_job(self, job: str, outcome: dict[str, Any]) -> None:
        with self._lock:
            self._jobs.pop(job, None)
            self._jobs[job] = outcome
            self._save()
