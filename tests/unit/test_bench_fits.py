"""The bench's verdict on growth with the number of policy modules: the fits it rests on, and the budget that
decides which counts run (bench/common.py, bench/modules.py, bench/report.py)."""

from __future__ import annotations

import pytest

from bench.bundle import bundle_counts, prometheus_samples, watches_over
from bench.common import growth_exponent, polynomial_fit
from bench.modules import worth_running
from bench.report import module_fits, verdicts

COUNTS = (50, 100, 200, 300)


def test_a_fit_recovers_the_coefficients_of_exact_points() -> None:
    line = polynomial_fit([(1, 3), (2, 5), (3, 7)], 1)
    assert line == pytest.approx([1.0, 2.0])
    parabola = polynomial_fit([(x, 2 - x + 0.5 * x * x) for x in (0, 1, 2, 3, 4)], 2)
    assert parabola == pytest.approx([2.0, -1.0, 0.5])


def test_a_fit_needs_as_many_distinct_x_as_coefficients() -> None:
    assert polynomial_fit([(1, 1), (1, 2), (2, 3)], 2) is None
    assert growth_exponent([(50, 1.0), (50, 2.0)]) is None
    assert growth_exponent([]) is None
    assert growth_exponent([(50, 0.0), (100, 1.0)]) is None  # no power law through a zero


def test_the_growth_exponent_tells_proportional_from_quadratic_growth() -> None:
    assert growth_exponent([(m, 0.004 * m) for m in COUNTS]) == pytest.approx(1.0)
    assert growth_exponent([(m, 0.00125 * m * m) for m in COUNTS]) == pytest.approx(2.0)
    # bundle mode's expected shape: a fixed start-up and one compile that grows with the modules
    assert (growth_exponent([(m, 1.5 + 0.004 * m) for m in COUNTS]) or 9) < 0.5
    # push mode's: the start-up, and every PUT compiling all the modules loaded so far
    assert (growth_exponent([(m, 1.5 + 0.00125 * m * m) for m in COUNTS]) or 0) > 1.7


def test_noise_around_a_flat_line_stays_far_below_the_bound() -> None:
    assert abs(growth_exponent([(50, 2.1), (100, 2.0), (200, 2.4), (300, 2.5)]) or 9) < 0.2


def _modules(bundle: list[float], push: list[float]) -> dict[str, object]:
    return {
        "rules_per_module": 20,
        "budget_seconds": 0,
        "skipped": {"bundle": [], "push": []},
        "runs": {
            mode: [{"modules": m, "initial": t, "refill": t / 2} for m, t in zip(COUNTS, times, strict=True)]
            for mode, times in (("bundle", bundle), ("push", push))
        },
    }


def test_the_verdict_is_met_when_bundle_mode_is_linear_and_push_mode_is_not() -> None:
    section = _modules([2.0, 2.2, 2.6, 3.0], [4.6, 14.0, 51.5, 114.0])
    fits = module_fits(section)
    assert fits["bundle"]["initial"]["linear"] and not fits["push"]["initial"]["linear"]
    found = [v for v in verdicts({"bundle": {"modules": section}}) if "policy modules" in v["target"]]
    assert [v["met"] for v in found] == [True, True]
    assert found[0]["measured"].startswith("k = 0.2")

    both_quadratic = _modules([4.6, 14.0, 51.5, 114.0], [4.6, 14.0, 51.5, 114.0])
    found = [v for v in verdicts({"bundle": {"modules": both_quadratic}}) if "policy modules" in v["target"]]
    assert [v["met"] for v in found] == [False, False]


def test_the_first_two_counts_always_run_and_later_ones_only_within_the_budget_left() -> None:
    done = [{"modules": 50, "initial": 3.0, "refill": 2.0}, {"modules": 100, "initial": 12.0, "refill": 11.0}]
    assert worth_running(done[:1], 100, left=-5)  # one so far: a growth exponent needs two points
    assert worth_running(done, 200, left=120)  # 23 s x (200/100)^2 = 92 s
    assert not worth_running(done, 200, left=60)


def test_the_bundle_counters_and_the_watches_are_read_from_prometheus_text() -> None:
    text = """# HELP kopa_bundle_responses_total Answers of the bundle endpoint.
# TYPE kopa_bundle_responses_total counter
kopa_bundle_responses_total{kind="delta"} 1000.0
kopa_bundle_responses_total{kind="snapshot"} 10.0
kopa_bundle_sent_bytes_total{kind="delta"} 428000.0
apiserver_longrunning_requests{group="",resource="services",scope="cluster",verb="WATCH",version="v1"} 10
apiserver_longrunning_requests{group="",resource="services",scope="namespace",verb="WATCH",version="v1"} 1
apiserver_longrunning_requests{group="",resource="pods",scope="namespace",verb="GET",version="v1"} 3
"""
    samples = prometheus_samples(text)
    assert bundle_counts(samples, "kopa_bundle_responses_total") == {"delta": 1000.0, "snapshot": 10.0}
    assert bundle_counts(samples, "kopa_bundle_sent_bytes_total") == {"delta": 428000.0}
    assert watches_over({"services": 11, "configmaps": 2}, {"services": 1, "configmaps": 2}) == {
        "services": 10
    }
