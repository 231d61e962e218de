"""Latency histograms and rate meters for the camera loop and the reports.

A histogram keeps counts in log-spaced buckets (2% wide), so p50/p95/p99 come
out within 2% without storing samples, in constant memory, for months.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import numpy as np

_MIN_S = 1e-6  # 1 us
_RATIO = 1.02
_LOG_RATIO = math.log(_RATIO)
_BUCKETS = math.ceil(math.log(1e4 / _MIN_S) / _LOG_RATIO) + 2  # up to ~3 hours


class Histogram:
    """Counts of durations in seconds. Thread-safe; `record` is O(1)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = np.zeros(_BUCKETS, dtype=np.int64)
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = 0.0

    def record(self, seconds: float) -> None:
        if seconds <= _MIN_S:
            idx = 0
        else:
            idx = min(int(math.log(seconds / _MIN_S) / _LOG_RATIO) + 1, _BUCKETS - 1)
        with self._lock:
            self._counts[idx] += 1
            self.count += 1
            self.total += seconds
            if seconds < self.min:
                self.min = seconds
            if seconds > self.max:
                self.max = seconds

    def merge(self, other: Histogram) -> None:
        with other._lock:
            counts, count, total, lo, hi = other._counts.copy(), other.count, other.total, other.min, other.max
        with self._lock:
            self._counts += counts
            self.count += count
            self.total += total
            self.min = min(self.min, lo)
            self.max = max(self.max, hi)

    def percentile(self, q: float) -> float:
        """The q-th percentile (0-100) in seconds; 0.0 when empty."""
        with self._lock:
            return self._percentile_locked(q)

    def _percentile_locked(self, q: float) -> float:
        if self.count == 0:
            return 0.0
        rank = max(1, math.ceil(q / 100.0 * self.count))
        idx = int(np.searchsorted(np.cumsum(self._counts), rank))
        if idx == 0:
            value = _MIN_S
        else:
            # geometric middle of the bucket [MIN*r^(idx-1), MIN*r^idx)
            value = _MIN_S * _RATIO ** (idx - 0.5)
        return min(max(value, self.min), self.max)

    def summary_ms(self, quantiles: tuple[float, ...] = (50, 95, 99)) -> dict[str, float]:
        with self._lock:
            out = {f"p{q:g}": round(self._percentile_locked(q) * 1e3, 3) for q in quantiles}
            out["mean"] = round(self.total / self.count * 1e3, 3) if self.count else 0.0
            out["max"] = round(self.max * 1e3, 3)
            out["n"] = self.count
        return out

    def take(self) -> Histogram:
        """Return a copy of this histogram and reset it (a reporting window)."""
        snap = Histogram()
        with self._lock:
            snap._counts, self._counts = self._counts, np.zeros(_BUCKETS, dtype=np.int64)
            snap.count, snap.total, snap.min, snap.max = self.count, self.total, self.min, self.max
            self.count, self.total, self.min, self.max = 0, 0.0, math.inf, 0.0
        return snap


class RateMeter:
    """Events per second, smoothed (for a live display) and over report windows."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, halflife_s: float = 2.0) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._halflife = halflife_s
        self._rate = 0.0
        self._last: float | None = None
        self._primed = False
        self._window_start = clock()
        self._window_count = 0
        self.total = 0

    def tick(self, n: int = 1) -> None:
        now = self._clock()
        with self._lock:
            self.total += n
            self._window_count += n
            if self._last is not None:
                dt = max(now - self._last, 1e-9)
                if self._primed:
                    alpha = 1.0 - 0.5 ** (dt / self._halflife)
                    self._rate += alpha * (n / dt - self._rate)
                else:  # first interval: start from it rather than from zero
                    self._rate, self._primed = n / dt, True
            self._last = now

    @property
    def rate(self) -> float:
        """Smoothed rate; decays toward zero when events stop."""
        with self._lock:
            if self._last is None:
                return 0.0
            idle = self._clock() - self._last
            return self._rate * (0.5 ** (max(0.0, idle - 1.0) / self._halflife))

    def take_window(self) -> tuple[int, float]:
        """(events, seconds) since the last call, and start a new window."""
        now = self._clock()
        with self._lock:
            n, dt = self._window_count, now - self._window_start
            self._window_count, self._window_start = 0, now
        return n, dt
