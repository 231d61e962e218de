from __future__ import annotations

import numpy as np
import pytest

from agent.camera.stats import Histogram, RateMeter


def test_percentiles_within_two_percent_of_exact() -> None:
    rng = np.random.default_rng(0)
    samples = rng.lognormal(mean=np.log(0.018), sigma=0.3, size=20000)
    h = Histogram()
    for s in samples:
        h.record(float(s))
    for q in (50, 95, 99):
        exact = float(np.percentile(samples, q))
        assert h.percentile(q) == pytest.approx(exact, rel=0.02)
    assert h.count == 20000
    assert h.summary_ms()["max"] == pytest.approx(samples.max() * 1e3, abs=1e-3)


def test_take_resets_and_merge_adds() -> None:
    h = Histogram()
    for v in (0.001, 0.002, 0.003):
        h.record(v)
    snap = h.take()
    assert snap.count == 3 and h.count == 0 and h.percentile(50) == 0.0
    other = Histogram()
    other.record(0.5)
    snap.merge(other)
    assert snap.count == 4 and snap.percentile(100) == pytest.approx(0.5, rel=0.02)


def test_extremes_do_not_break_buckets() -> None:
    h = Histogram()
    h.record(0.0)
    h.record(1e-9)
    h.record(1e6)
    assert h.count == 3 and h.percentile(0) >= 0


def test_rate_meter_with_injected_clock() -> None:
    now = [0.0]
    m = RateMeter(clock=lambda: now[0], halflife_s=0.5)
    for _ in range(100):
        now[0] += 0.02  # 50 Hz
        m.tick()
    assert m.rate == pytest.approx(50.0, rel=0.01)
    n, dt = m.take_window()
    assert n == 100 and dt == pytest.approx(2.0)
    now[0] += 10.0  # events stopped: the live rate decays
    assert m.rate < 1.0
